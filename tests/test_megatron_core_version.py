"""The megatron-core version guard of the patches that reach into its internals."""

from __future__ import annotations

import pytest

from retro_toolkit.core.cpu import patches as cpu


def test_the_installed_megatron_core_is_one_the_patches_were_tested_on():
    from megatron import core

    assert core.__version__ in cpu.TESTED_MEGATRON_CORE


def test_an_untested_version_is_named_once(monkeypatch):
    from megatron import core

    monkeypatch.setattr(cpu, "_version_checked", False)
    monkeypatch.setattr(core, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match=r"megatron-core 0\.99\.0 is installed.*tested on 0\.16\.1.*"
                                         r"megatron-core==0\.16\.1"):
        assert "0.99.0" in cpu.check_version()
    assert cpu.check_version() is None
