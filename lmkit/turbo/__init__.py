"""Python side of the turbo C++ engine (src/turbo/, built as lmkit._turbo)."""
