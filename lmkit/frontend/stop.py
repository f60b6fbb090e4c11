"""Stop strings over streamed text: output ends right before the first stop string and never shows any of it.

Text that might be the start of a stop string (the longest suffix of what came so far that is a prefix of
some stop string) is held back until the next piece decides it; so a stop string split over several tokens,
or several stop strings overlapping, never leak a single character.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what is safe to show and whether a stop string was hit."""

    def __init__(self, stops: list[str] | str | None) -> None:
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in (stops or []) if s]
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit, whether a stop string ended the output)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.held + text
        # `held` is shorter than the longest stop string and holds none, so searching `buf` is O(len(text)).
        hit = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.held = ""
            self.stopped = True
            return buf[:hit], True
        keep = self._partial_suffix(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The stream ended without a stop string: release what was held back."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self.max_len - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
