"""StopMatcher: output ends right before the first stop string, and no part of a stop string ever leaks."""

from __future__ import annotations

from lmkit.frontend.stop import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return out, stopped


def test_no_stops_passes_through():
    assert run(None, ["a", "b"]) == (["a", "b", ""], False)


def test_stop_spanning_pieces_never_leaks():
    out, stopped = run(["<END>"], ["Hello ", "<", "E", "N", "D>", " more"])
    assert stopped and "".join(out) == "Hello "
    assert out[:5] == ["Hello ", "", "", "", ""]  # '<', 'E', 'N' were held, then dropped


def test_stop_in_first_piece():
    assert run(["Hi"], ["Hi there"]) == ([""], True)
    assert run(["there"], ["Hi there you"]) == (["Hi "], True)


def test_held_text_released_when_it_is_not_a_stop():
    out, stopped = run(["<END>"], ["a<", "EN", "x", "b"])
    assert not stopped and "".join(out) == "a<ENxb"
    assert out[0] == "a" and out[1] == "" and out[2] == "<ENx"


def test_held_text_released_at_the_end():
    out, stopped = run(["<END>"], ["abc<E"])
    assert not stopped and out == ["abc", "<E"]


def test_overlapping_stops_earliest_wins():
    assert "".join(run(["abc", "bcd"], ["xa", "bcd"])[0]) == "x"
    assert "".join(run(["hello world", "world"], ["say hello ", "world"])[0]) == "say "
    assert "".join(run(["ab", "b"], ["a", "b"])[0]) == ""
    assert "".join(run(["aab"], ["a", "a", "a", "b"])[0]) == "a"


def test_stop_after_many_pieces_matches_full_text():
    text = "The answer is 42.\nQuestion: next"
    for size in (1, 2, 3, 5):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        out, stopped = run(["\nQuestion:"], pieces)
        assert stopped and "".join(out) == "The answer is 42."
        for i in range(len(out)):
            assert "\n" not in "".join(out[: i + 1])


def test_feed_after_stop_emits_nothing():
    m = StopMatcher("x")
    assert m.feed("axb") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
