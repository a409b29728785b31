import pytest
import torch

from nsa_flex import NSAConfig


def test_defaults_are_the_papers():
    c = NSAConfig()
    assert (c.compress_block, c.compress_stride, c.select_block) == (32, 16, 64)
    assert (c.num_selected, c.num_initial, c.num_local, c.window) == (16, 1, 2, 512)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(compress_block=0), "compress_block"),
        (dict(compress_stride=-1), "compress_stride"),
        (dict(select_block=0), "select_block"),
        (dict(num_selected=0, num_initial=0, num_local=0), "num_selected"),
        (dict(num_initial=-1), "num_initial"),
        (dict(num_local=-2), "num_local"),
        (dict(window=0), "window"),
        (dict(compress_block=40), "compress_stride"),  # 16 does not divide 40
        (dict(select_block=72), "compress_stride"),  # 16 does not divide 72
        (dict(num_selected=2), "num_selected"),  # 1 + 2 > 2
    ],
)
def test_broken_rule_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NSAConfig(**kwargs)


@pytest.mark.parametrize("value", [1.5, "32", None, True])
def test_non_int_field_is_a_type_error(value):
    with pytest.raises(TypeError, match="compress_block"):
        NSAConfig(compress_block=value)


def test_derived_sizes():
    c = NSAConfig()
    assert c.num_compressed(31) == 0
    assert c.num_compressed(32) == 1
    assert c.num_compressed(47) == 1
    assert c.num_compressed(48) == 2
    assert c.num_compressed(65536) == 4095
    assert c.num_select_blocks(1) == 1
    assert c.num_select_blocks(64) == 1
    assert c.num_select_blocks(65) == 2


def test_config_is_hashable_and_frozen():
    c = NSAConfig()
    assert hash(c) == hash(NSAConfig())
    with pytest.raises(Exception):
        c.window = 3


@pytest.mark.parametrize("l, d", [(32, 16), (8, 4), (16, 16), (4, 1)])
def test_the_compressed_block_rule(l, d):
    # block i covers tokens i*d .. i*d + l - 1 and is visible from its last token on; the int
    # and tensor forms agree with counting the blocks by hand
    config = NSAConfig(compress_block=l, compress_stride=d, select_block=2 * l)
    for t in range(-3, 5 * l):
        seen = sum(1 for i in range(5 * l) if i * d + l - 1 <= t)
        assert config.num_visible_compressed(t) == seen, t
        assert int(config.num_visible_compressed(torch.tensor(t))) == seen, t
        assert config.num_compressed(t + 1) == seen if t >= 0 else True
    i = torch.arange(10)
    assert torch.equal(config.compressed_last_token(i), i * d + l - 1)
    assert config.compressed_last_token(3) == 3 * d + l - 1
