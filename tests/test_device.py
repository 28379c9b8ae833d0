"""histobench.device: the device rule and the channels-last layout used on CUDA."""

import torch

from histobench.device import channels_last, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_channels_last_only_on_cuda_and_same_outputs():
    x = torch.randn(2, 3, 16, 16)
    ref = _cnn()
    expected = ref(x)
    assert channels_last(ref, torch.device("cpu")) is ref
    assert ref[0].weight.is_contiguous()  # unchanged on the CPU
    # the layout change itself (a cuda device object needs no GPU; the module stays where it is)
    model = channels_last(_cnn(), torch.device("cuda"))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert model[5].weight.is_contiguous()  # 2-D weights are untouched
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
