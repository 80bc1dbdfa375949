"""Names that lived elsewhere before the core redesign stay importable from their old homes."""

import torch


def test_conv_patch_extraction_keeps_its_old_home():
    from gnsp_optim.kinds import conv_patches
    from gnsp_optim.naive import conv_patches_loop
    from gnsp_optim.statistics import conv_patches as old_fast
    from gnsp_optim.statistics import conv_patches_reference as old_slow

    assert old_fast is conv_patches and old_slow is conv_patches_loop
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(old_fast(conv, x), old_slow(conv, x))


def test_unknown_statistics_attribute_is_an_attribute_error():
    import pytest

    import gnsp_optim.statistics as stats

    with pytest.raises(AttributeError, match="no_such_name"):
        stats.no_such_name  # noqa: B018
