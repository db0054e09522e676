"""CustResNet: parameter count, shapes, receptive field."""

import pytest
import torch

from fastcifar.model import CustResNet, count_parameters, receptive_field, receptive_field_table

pytestmark = pytest.mark.full_width  # the real network, not the suite's narrow one


def test_custresnet_has_exactly_6_573_130_parameters():
    assert count_parameters(CustResNet()) == 6_573_130


def test_custresnet_maps_a_batch_to_ten_logits_in_channels_last():
    torch.manual_seed(0)
    model = CustResNet().eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        contiguous = model(images)
        each = torch.cat([model(image[None]) for image in images])
        model.to(memory_format=torch.channels_last)
        channels_last = model(images.contiguous(memory_format=torch.channels_last))
    assert channels_last.shape == (4, 10)
    # the same numbers in either memory format, each image's logits its own (eval: no batch
    # statistics), and different images give different logits
    torch.testing.assert_close(channels_last, contiguous, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(each, contiguous, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(contiguous[0], contiguous[1])


def test_receptive_field_is_81_by_the_design_convention_and_88_exact():
    model = CustResNet()
    assert receptive_field(model) == 81
    assert receptive_field(model, pools_widen=True) == 88
    rows = receptive_field_table(model)
    assert rows[0].name == "input" and rows[-1].name == "pool"
    assert rows[-1].jump == 32  # four stride-2/4 poolings: 2 * 2 * 2 * 4


def test_logit_scale_multiplies_the_logits():
    torch.manual_seed(0)
    plain = CustResNet().eval()
    scaled = CustResNet(logit_scale=0.125).eval()
    scaled.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scaled(images), plain(images) * 0.125)


def test_zero_init_residuals_makes_each_residual_block_its_pooled_conv():
    from fastcifar.model import zero_init_residuals_

    model = CustResNet()
    zero_init_residuals_(model)
    x = torch.randn(4, 64, 16, 16)
    for block in (model.layer1, model.layer3):
        inputs = x if block is model.layer1 else torch.randn(4, 256, 8, 8)
        torch.testing.assert_close(block(inputs), block.conv(inputs), rtol=0, atol=0)
    x2 = torch.randn(4, 128, 8, 8)
    assert not torch.equal(model.layer2(x2), torch.zeros_like(model.layer2(x2)))


def test_global_pool_is_the_4x4_pool_at_32_px_and_takes_smaller_images():
    torch.manual_seed(0)
    model = CustResNet().eval()
    images = torch.randn(3, 3, 32, 32)
    features = model.layer3(model.layer2(model.layer1(model.prep(images))))
    assert features.shape[2:] == (4, 4)
    four_by_four = torch.nn.functional.max_pool2d(features, 4).flatten(1)
    torch.testing.assert_close(model(images), model.fc(four_by_four))
    for side in (8, 20, 24, 28):
        assert model(torch.randn(2, 3, side, side)).shape == (2, 10)
