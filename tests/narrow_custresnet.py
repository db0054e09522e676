"""The suite's narrow CustResNet: TEST_WIDTH, and as a script, `fastcifar ARGS` built with it.

The in-process tests get it from conftest.py; tests that start their own processes (torchrun's
ranks) run this file instead of `-m fastcifar`, so they train the same network as the rest."""

TEST_WIDTH = 16  # a quarter of CustResNet's 64: ~1/16 of its FLOPs


def narrow(monkeypatch=None) -> None:
    """CUSTRESNET_WIDTH at TEST_WIDTH and the selection proxy at a quarter of it (through
    `monkeypatch` where given, so a test can undo it)."""
    import fastcifar.model
    import fastcifar.selection

    for module, name, value in ((fastcifar.model, "CUSTRESNET_WIDTH", TEST_WIDTH),
                                (fastcifar.selection, "PROXY_WIDTH", TEST_WIDTH // 4)):
        if monkeypatch is None:
            setattr(module, name, value)
        else:
            monkeypatch.setattr(module, name, value)


if __name__ == "__main__":
    import sys

    narrow()
    from fastcifar.cli import entry

    sys.argv[0] = "fastcifar"
    entry()
