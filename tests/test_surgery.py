from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from clipq_search import ConfigError, LayerConfig, Plan, attach_clipq, attached_configs, clipq_quantize, strip_clipq


class GroupedNet(nn.Module):
    """Grouped and depthwise convolutions, batch norm, biases, Conv1d/3d and Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 3, groups=4, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, groups=32, padding=1, bias=False)
        self.conv1d = nn.Conv1d(32, 8, 3)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.head = nn.Linear(8 * 62, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.depthwise(self.grouped(x))
        x = x.flatten(2)[:, :, :64]
        x = self.conv1d(x)
        x = self.conv3d(x[:, None, :, :, None])[:, 0, :, :, 0]
        return self.head(x.flatten(1))


def test_forward_sees_quantized_weights_and_gradient_reaches_clipped() -> None:
    torch.manual_seed(0)
    model = GroupedNet()
    attach_clipq(model, {"layers": {"grouped": {"p": 0.8, "bits": 3}, "head": {"p": 0.8, "bits": 3}}})
    fp = model.grouped.parametrizations.weight.original
    torch.testing.assert_close(model.grouped.weight, clipq_quantize(fp.detach(), 0.8, 3))
    out = model(torch.randn(2, 3, 8, 8))
    out.square().sum().backward()
    clipped = model.grouped.weight.detach() == 0
    assert clipped.float().mean() > 0.7
    assert fp.grad is not None and bool((fp.grad[clipped] != 0).any())


def test_straight_through_gradient_is_unchanged() -> None:
    lin = nn.Linear(20, 5)
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 2}}})
    x = torch.randn(7, 20)
    (lin(x) * torch.arange(5.0)).sum().backward()
    expected = torch.arange(5.0)[:, None] * x.sum(0)[None, :]
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, expected)


def test_the_straight_through_weight_is_the_quantized_memory_with_the_plain_gradient() -> None:
    from clipq_search.core.surgery import straight_through

    original = torch.randn(6, 9, requires_grad=True)
    quantized = clipq_quantize(original.detach(), 0.5, 3)
    out = straight_through(original, quantized)
    assert out.data_ptr() == quantized.data_ptr() and out.data_ptr() != original.data_ptr()
    assert torch.equal(out.detach(), quantized) and out.requires_grad and out.shape == original.shape
    upstream = torch.randn(6, 9)
    (out * upstream).sum().backward()
    assert torch.equal(original.grad, upstream)


def test_reading_the_weight_takes_parametrize_s_own_way_whenever_it_does_more() -> None:
    """The quick ``weight`` property gives what parametrize's gives, and defers to it for caching and chains."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    lin = nn.Linear(40, 30)
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 3}}})
    original = lin.parametrizations.weight.original
    expected = clipq_quantize(original.detach(), 0.5, 3)
    assert torch.equal(lin.weight.detach(), expected)
    assert torch.equal(type(lin).weight.fget(lin).detach(), expected)
    with parametrize.cached():  # parametrize's cache: one tensor for every read
        assert lin.weight is lin.weight
    parametrize.register_parametrization(lin, "weight", Twice())
    assert torch.equal(lin.weight.detach(), 2 * expected)
    x = torch.randn(3, 40)
    lin(x).sum().backward()
    torch.testing.assert_close(original.grad, 2 * torch.ones(3, 30).t() @ x)
    strip_clipq(nn.Sequential(lin))
    assert not parametrize.is_parametrized(lin)
    assert torch.equal(lin.weight.detach(), 2 * expected)


def test_a_traced_model_computes_with_the_quantized_weights() -> None:
    """torch.jit.trace records operations: it must record the quantized weight, not a view of the full-precision one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3))
    attach_clipq(model, {"default": {"p": 0.7, "bits": 2}})
    x = torch.randn(5, 40)
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, and warns of its constants
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)  # its check traces again under no_grad: the same graph
    assert torch.equal(traced(x), model(x))
    stripped = copy.deepcopy(model)
    strip_clipq(stripped)
    assert torch.equal(traced(x), stripped(x))


def test_weight_reads_run_hooks_and_work_for_a_weight_that_is_a_buffer() -> None:
    """Reading ``weight`` goes through the modules as parametrize does when hooks listen or the weight is a buffer."""
    from torch.nn.modules.module import register_module_forward_hook

    lin = nn.Linear(20, 6)
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 3}}})
    expected = clipq_quantize(lin.parametrizations.weight.original.detach(), 0.5, 3)
    seen: list[str] = []
    handles = [
        lin.parametrizations.weight[0].register_forward_hook(lambda *_: seen.append("clipq")),
        lin.parametrizations.weight.register_forward_pre_hook(lambda *_: seen.append("chain")),
    ]
    assert torch.equal(lin.weight.detach(), expected) and seen == ["chain", "clipq"]
    for h in handles:
        h.remove()
    seen.clear()
    handle = register_module_forward_hook(lambda module, *_: seen.append(type(module).__name__))
    try:
        assert torch.equal(lin.weight.detach(), expected)
    finally:
        handle.remove()
    assert seen == ["ClipQWeight", "ParametrizationList"]
    seen.clear()
    lin.weight  # noqa: B018 - no hook left: the quick way, nothing recorded
    assert seen == []

    buffered = nn.Linear(20, 6)
    weight = buffered.weight.detach().clone()
    del buffered.weight
    buffered.register_buffer("weight", weight)
    attach_clipq(nn.Sequential(buffered), {"layers": {"0": {"p": 0.5, "bits": 3}}})
    assert "original" in buffered.parametrizations.weight._buffers
    assert torch.equal(buffered.weight, clipq_quantize(weight, 0.5, 3))
    assert hasattr(buffered, "weight")


def test_recomputed_each_step_and_training_moves_fp_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 3))
    attach_clipq(model, {"default": {"p": 0.5, "bits": 3}})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[0].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 30)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    after = model[0].weight.detach()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, clipq_quantize(model[0].parametrizations.weight.original.detach(), 0.5, 3))


def test_plan_names_patterns_default_dense_and_errors() -> None:
    model = GroupedNet()
    plan = Plan.from_dict(
        {
            "layers": {
                "head": {"p": 0.9, "bits": 2},
                "re:.*conv.*": {"p": 0.3, "bits": 6},
                "g*": {"p": 0.4, "bits": 4},
            },
            "default": {"p": 0.5, "bits": 5},
            "dense": ["stem"],
        }
    )
    got = plan.resolve(model)
    assert got["head"].bits == 2 and got["conv1d"].bits == 6 and got["conv3d"].bits == 6
    assert got["grouped"].bits == 4 and got["depthwise"].bits == 5 and "stem" not in got
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ConfigError, match="unknown layer 'fc9'.*stem, grouped"):
        Plan.from_dict({"layers": {"fc9": {"p": 0.5, "bits": 3}}}).resolve(model)
    with pytest.raises(ConfigError, match="matches no compressible layer"):
        Plan.from_dict({"layers": {"fc*": {"p": 0.5, "bits": 3}}}).resolve(model)
    with pytest.raises(ConfigError, match="compresses no layer"):
        Plan.from_dict({"default": {"p": 0.5, "bits": 3}, "dense": ["*"]}).resolve(model)
    with pytest.raises(ValueError, match="bits=9"):
        Plan.from_dict({"layers": {"head": {"p": 0.5, "bits": 9}}})
    with pytest.raises(ConfigError, match=r"plan key 're:fc\[' is not a valid regular expression"):
        Plan.from_dict({"layers": {"re:fc[": {"p": 0.5, "bits": 3}}})
    with pytest.raises(ConfigError, match=r"no compressible layer .*below its top module.*nn\.Sequential\(layer\)"):
        attach_clipq(nn.Linear(8, 4), {"default": {"p": 0.5, "bits": 3}})  # a bare layer is the top module


def test_state_dicts_load_into_and_save_from_attached_model() -> None:
    torch.manual_seed(0)
    plain = GroupedNet()
    sd = copy.deepcopy(plain.state_dict())
    model = GroupedNet()
    attach_clipq(model, {"default": {"p": 0.5, "bits": 4}})
    model.load_state_dict(sd, strict=True)
    saved = model.state_dict()
    assert set(saved) == set(sd)
    for key in sd:
        torch.testing.assert_close(saved[key], sd[key])
    fresh = GroupedNet()
    fresh.load_state_dict(saved, strict=True)


def test_strip_bakes_weights_in_and_drops_fp_copies() -> None:
    torch.manual_seed(0)
    model = GroupedNet().eval()
    attach_clipq(model, {"default": {"p": 0.6, "bits": 3}})
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    stripped = strip_clipq(model)
    assert set(stripped.layers) == {"stem", "grouped", "depthwise", "conv1d", "conv3d", "head"}
    assert stripped.layers["head"] == LayerConfig(0.6, 3)
    assert attached_configs(model) == {}
    assert not any("original" in n for n, _ in model.named_parameters())
    assert torch.equal(model(x), y)


def _clipq_mlp(
    p: float, bits: int, *, seed: int, lr: float, momentum: float = 0.0
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A 30-400-3 MLP with CLIP-Q on both layers, and its SGD optimizer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 400), nn.ReLU(), nn.Linear(400, 3))
    attach_clipq(model, {"default": {"p": p, "bits": bits}})
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(16, 30, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_training_steps_are_exact_and_report_their_statistics() -> None:
    """Each step's weight is the operator on the current fp weight (the compiled step path), stats included."""
    from clipq_search.core.operator import clipq_quantize_with_stats

    model, opt = _clipq_mlp(0.9, 4, seed=1, lr=0.05, momentum=0.9)
    par = model[0].parametrizations.weight
    for step in range(6):
        _train_steps(model, opt, 1, seed=step)
        with torch.no_grad():
            ref, ref_stats = clipq_quantize_with_stats(par.original.detach(), 0.9, 4)
            assert torch.equal(model[0].weight, ref)
        stats = par[0].last_stats
        assert (stats.c_neg, stats.c_pos, stats.rank_neg, stats.rank_pos) == (
            ref_stats.c_neg, ref_stats.c_pos, ref_stats.rank_neg, ref_stats.rank_pos)
        assert torch.equal(stats.levels.nan_to_num(7.0), ref_stats.levels.nan_to_num(7.0))


def test_p_and_bits_set_on_a_layer_apply_from_the_next_update() -> None:
    model, opt = _clipq_mlp(0.5, 3, seed=5, lr=0.05)
    _train_steps(model, opt, 3, seed=0)
    par = model[0].parametrizations.weight
    par[0].p, par[0].bits = 0.9, 2
    _train_steps(model, opt, 2, seed=1)
    with torch.no_grad():
        assert torch.equal(model[0].weight, clipq_quantize(par.original, 0.9, 2))


@pytest.mark.parametrize("other", [torch.float64, torch.float16, torch.bfloat16])
def test_training_continues_after_a_pass_in_another_precision(other: torch.dtype) -> None:
    model, opt = _clipq_mlp(0.7, 3, seed=6, lr=0.05)
    _train_steps(model, opt, 2, seed=0)
    model.to(other)
    with torch.no_grad():
        model(torch.randn(2, 30, dtype=other))
    model.float()
    _train_steps(model, opt, 2, seed=1)
    with torch.no_grad():
        assert model[0].weight.dtype == torch.float32
        assert torch.equal(model[0].weight, clipq_quantize(model[0].parametrizations.weight.original, 0.7, 3))


def test_a_replaced_weight_of_another_shape_is_followed() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(30, 20)
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 3}}})
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        lin(torch.randn(4, 30)).sum().backward()
        opt.step()
    original = lin.parametrizations.weight.original
    original.data = torch.randn(20, 30).t().contiguous()  # same size, other shape and memory
    with torch.no_grad():
        assert lin.weight.shape == (30, 20)
        assert torch.equal(lin.weight, clipq_quantize(original, 0.5, 3))


def test_training_writes_each_result_into_the_layer_s_buffer() -> None:
    """Every step's result is computed into the one buffer the layer owns: no allocation per step."""
    model, opt = _clipq_mlp(0.8, 3, seed=2, lr=0.5, momentum=0.9)
    _train_steps(model, opt, 2, seed=0)
    addresses = set()
    for step in range(4):
        _train_steps(model, opt, 1, seed=step)
        with torch.no_grad():
            weight = model[0].weight
            assert torch.equal(weight, clipq_quantize(model[0].parametrizations.weight.original, 0.8, 3))
            assert weight is model[0].parametrizations.weight[0].quantized
            addresses.add(weight.data_ptr())
    assert len(addresses) == 1


def test_the_buffer_is_not_saved_in_state_dicts() -> None:
    model, _ = _clipq_mlp(0.8, 3, seed=2, lr=0.5)
    model(torch.randn(2, 30))
    assert not any("quantized" in key for key in model.state_dict())


def test_a_result_written_again_has_a_new_version() -> None:
    """The buffer rewritten by a step is the same tensor with new values and a higher version."""
    model, opt = _clipq_mlp(0.8, 3, seed=2, lr=0.5)
    _train_steps(model, opt, 2, seed=0)
    with torch.no_grad():
        weight = model[0].weight
        version, values = weight._version, weight.clone()
    _train_steps(model, opt, 1, seed=1)
    with torch.no_grad():
        again = model[0].weight
    assert again is weight
    assert again._version > version and not torch.equal(again, values)


@pytest.mark.parametrize("first", ["training", "inference"])
def test_results_made_in_inference_mode_are_not_handed_to_training(first: str) -> None:
    """The buffer stays an ordinary tensor, also when first made under inference_mode: training goes on."""
    model, opt = _clipq_mlp(0.8, 3, seed=2, lr=0.5)
    if first == "inference":
        with torch.inference_mode():
            model(torch.randn(4, 30))
    for _ in range(3):
        _train_steps(model, opt, 1, seed=0)
        with torch.inference_mode():
            model(torch.randn(4, 30))
            with torch.no_grad():
                assert torch.equal(model[0].weight, clipq_quantize(model[0].parametrizations.weight.original, 0.8, 3))
        _train_steps(model, opt, 1, seed=1)  # would raise on an inference tensor


@pytest.mark.parametrize("holder", ["result", "alias", "view"])
def test_a_weight_someone_holds_follows_the_layer_and_its_version_says_so(holder: str) -> None:
    """FakeSparsity's contract: a held weight is the layer's buffer; after a step it shows the new values and
    a higher version (what autograd checks), never stale values under the old version."""
    model, opt = _clipq_mlp(0.8, 3, seed=2, lr=0.5)
    _train_steps(model, opt, 2, seed=0)
    if holder == "result":
        with torch.no_grad():
            kept = model[0].weight
    elif holder == "alias":
        kept = model[0].weight.detach()
    else:
        with torch.no_grad():
            kept = model[0].weight[3:7]
    before, version = kept.detach().clone(), kept._version
    _train_steps(model, opt, 3, seed=1)
    with torch.no_grad():
        now = model[0].weight
    assert not torch.equal(kept, before) and kept._version > version
    assert torch.equal(kept, now if holder != "view" else now[3:7])


def test_a_graph_kept_across_an_optimizer_step_refuses_its_backward_as_a_plain_layer_does() -> None:
    """The weight a graph saved is rewritten in place at the next read after a step: autograd's version
    counter reports it, as it does for a plain layer's weight changed by the step itself."""
    model, opt = _clipq_mlp(0.8, 3, seed=2, lr=0.5)
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Linear(30, 400), nn.ReLU(), nn.Linear(400, 3))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for net, optimizer in ((plain, plain_opt), (model, opt)):
        x = torch.randn(4, 30)
        kept = net(x).sum()
        _train_steps(net, optimizer, 1, seed=1)
        net(x)  # the next forward pass reads the stepped weights
        with pytest.raises(RuntimeError, match="modified by an inplace operation|has been modified inplace"):
            kept.backward()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_fused_optimizer_s_steps_reach_the_forward_weights(optimizer: str) -> None:
    """Fused optimizers update weights without bumping their version: the layer still sees every step."""
    model, _ = _clipq_mlp(0.5, 3, seed=4, lr=0.1)
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=0.1, fused=True) if optimizer == "sgd" else torch.optim.Adam(params, fused=True)
    for seed in range(3):
        _train_steps(model, opt, 1, seed=seed)
        with torch.no_grad():
            seen = model[0].weight.clone()
            fp = model[0].parametrizations.weight.original
        assert torch.equal(seen, clipq_quantize(fp, 0.5, 3)), seed


def test_a_channels_last_conversion_after_training_keeps_the_layer_working() -> None:
    # model.to(memory_format=channels_last) converts buffers too: the result buffer is made anew, contiguous
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    attach_clipq(model, {"default": {"p": 0.5, "bits": 3}})
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        assert torch.equal(model[0].weight, clipq_quantize(model[0].parametrizations.weight.original, 0.5, 3))
    assert out.shape == (2, 2)


def test_an_in_place_edit_of_the_layer_s_weight_is_recomputed_from_the_full_precision_one() -> None:
    model, opt = _clipq_mlp(0.5, 3, seed=5, lr=0.1)
    _train_steps(model, opt, 1, seed=0)
    with torch.no_grad():
        nn.init.normal_(model[0].weight)  # the forward weight is the layer's buffer: the edit is undone
        assert torch.equal(model[0].weight, clipq_quantize(model[0].parametrizations.weight.original, 0.5, 3))


def test_a_layer_whose_weights_all_clip_trains_with_zeros() -> None:
    lin = nn.Linear(50, 40)
    with torch.no_grad():
        lin.weight.fill_(0.25)  # every positive weight ties at the threshold: nothing is kept
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 2}}})
    for _ in range(3):
        assert torch.equal(lin.weight.detach(), torch.zeros(40, 50))
        lin(torch.randn(3, 50)).sum().backward()
    assert lin.parametrizations.weight.original.grad is not None


def test_diverged_weights_give_a_nan_loss() -> None:
    model, opt = _clipq_mlp(0.5, 3, seed=9, lr=0.1)
    _train_steps(model, opt, 2, seed=3)
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, 0] = float("inf")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 30)), torch.randint(0, 3, (4,)))
    assert math.isnan(float(loss.detach()))


def test_a_deep_copy_of_a_training_model_trains_on_its_own() -> None:
    """deepcopy (as EMA or model-selection code does) works mid-training; the copy shares no step state."""
    model, opt = _clipq_mlp(0.9, 4, seed=4, lr=0.05)
    _train_steps(model, opt, 3, seed=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin[0].weight, model[0].weight)
    frozen = model[0].weight.detach().clone()
    _train_steps(twin, torch.optim.SGD(twin.parameters(), lr=0.05), 3, seed=1)
    with torch.no_grad():
        assert torch.equal(model[0].weight, frozen)  # the original is untouched by the copy's training
        assert torch.equal(twin[0].weight, clipq_quantize(twin[0].parametrizations.weight.original, 0.9, 4))


@pytest.mark.parametrize("strip", ["copy", "original"])
def test_stripping_a_deep_copy_leaves_the_other_model_attached(strip: str) -> None:
    """deepcopy shares parametrize's per-module class; stripping one model must not take the other's weight away."""
    model, opt = _clipq_mlp(0.9, 4, seed=4, lr=0.05)
    _train_steps(model, opt, 2, seed=0)
    twin = copy.deepcopy(model)
    stripped, kept = (twin, model) if strip == "copy" else (model, twin)
    strip_clipq(stripped)
    assert type(stripped[0]) is nn.Linear and attached_configs(stripped) == {}
    assert set(attached_configs(kept)) == {"0", "2"}
    with torch.no_grad():
        assert torch.equal(kept[0].weight, clipq_quantize(kept[0].parametrizations.weight.original, 0.9, 4))
        assert torch.equal(stripped[0].weight, kept[0].weight)
    _train_steps(kept, torch.optim.SGD(kept.parameters(), lr=0.05), 2, seed=1)  # the attached one still trains


def test_attaching_to_a_deep_copy_leaves_the_original_as_it_was() -> None:
    """A layer with another parametrization shares its class with its deep copy; attaching to the copy must not
    put a CLIP-Q weight property on the original."""
    from torch.nn.utils import parametrize

    class Halve(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b / 2

    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    parametrize.register_parametrization(model[0], "bias", Halve())
    twin = copy.deepcopy(model)
    attach_clipq(twin, {"default": {"p": 0.5, "bits": 3}})
    x = torch.randn(4, 30)
    plain = nn.functional.linear(x, model[0].weight, model[0].parametrizations.bias.original / 2)
    assert torch.equal(model[0](x), plain) and attached_configs(model) == {}
    assert torch.equal(twin[0].weight.detach(), clipq_quantize(model[0].weight.detach(), 0.5, 3))


def test_training_goes_on_after_an_evaluation_under_inference_mode() -> None:
    """A result computed under torch.inference_mode must not be reused by the next training step."""
    model, opt = _clipq_mlp(0.5, 3, seed=8, lr=0.05)
    _train_steps(model, opt, 2, seed=0)
    with torch.inference_mode():
        model(torch.randn(4, 30))
    original = model[0].parametrizations.weight.original
    before = original.detach().clone()
    _train_steps(model, opt, 2, seed=1)
    assert original.grad is not None and not torch.equal(original.detach(), before)
    assert not model[0].weight.is_inference()


def test_a_non_contiguous_weight_takes_the_general_path_without_setting_up_a_compiled_operator() -> None:
    lin = nn.Linear(30, 20)
    attach_clipq(nn.Sequential(lin), {"layers": {"0": {"p": 0.5, "bits": 3}}})
    original = lin.parametrizations.weight.original
    original.data = torch.randn(30, 20).t()  # a transposed view: not contiguous
    par = lin.parametrizations.weight[0]
    for _ in range(3):
        with torch.no_grad():
            original.add_(0.01)
            assert torch.equal(lin.weight, clipq_quantize(original.contiguous(), 0.5, 3))
        assert par._state["op"] is None


def _attached_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A seeded 3-layer MLP with CLIP-Q on every layer, and its SGD (the compile tests train two alike)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    attach_clipq(m, {"default": {"p": 0.8, "bits": 3}})
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_a_compiled_attached_model_trains_as_the_eager_one_without_recompiling() -> None:
    """torch.compile: one graph per layer shape, no recompile from step to step, the eager model's losses."""
    import torch._dynamo

    (eager, opt_e), (model, opt_c) = _attached_mlp(), _attached_mlp()
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 40, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(6)]

    def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = [(step(compiled, opt_c, x, y), step(eager, opt_e, x, y)) for x, y in batches[:2]]
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm: every later step reuses the graphs
        losses += [(step(compiled, opt_c, x, y), step(eager, opt_e, x, y)) for x, y in batches[2:]]
    assert [c for c, _ in losses] == [e for _, e in losses]
    torch._dynamo.reset()


def test_the_tensor_implementation_joins_the_compiled_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the tensor implementation runs (CUDA; here forced on CPU), a compiled model is one graph, no break,
    and trains exactly as the eager one."""
    import torch._dynamo

    monkeypatch.setenv("CLIPQ_SEARCH_KERNEL", "torch")

    (eager, opt_e), (model, opt_c) = _attached_mlp(), _attached_mlp()
    x0 = torch.randn(16, 40)
    explained = torch._dynamo.explain(model)(x0)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 40, generator=g), torch.randint(0, 3, (16,), generator=g)
        losses = []
        for net, opt in ((compiled, opt_c), (eager, opt_e)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[0] == losses[1]
    torch._dynamo.reset()


def test_a_cuda_graph_that_cannot_be_recorded_leaves_the_operator_running_without_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clipq_search.core import surgery

    def refuse(*args: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore lines")

    monkeypatch.setattr(surgery.torch.cuda, "current_stream", refuse)
    surgery.use_cuda_graphs(True)
    try:
        w = torch.randn(300)
        with pytest.warns(UserWarning, match=r"without CUDA graphs: recording one failed \(operation not permitted"):
            assert surgery._record(w, torch.empty_like(w), 0.5, 4) is None
        assert not surgery._cuda_graphs["on"]
    finally:
        surgery.use_cuda_graphs(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_operator_bit_for_bit_along_training() -> None:
    """Replayed graphs write what the operator computes, step after step, and the statistics follow."""
    from clipq_search.core import surgery
    from clipq_search.core.reference import reference_clipq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10)).cuda()
    attach_clipq(model, {"default": {"p": 0.7, "bits": 5}})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    surgery.use_cuda_graphs(True)
    try:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(32, 300, device="cuda")).square().mean().backward()
            opt.step()
            for layer in (model[0], model[2]):
                q = layer.weight.detach()
                original = layer.parametrizations.weight.original.detach().cpu()
                ref = reference_clipq(original, 0.7, 5)[0]
                assert torch.equal(q.cpu().view(torch.int32), ref.view(torch.int32))
        assert surgery._cuda_graphs["on"]
        assert model[0].parametrizations.weight[0]._state["graph"] is not None
    finally:
        surgery.use_cuda_graphs(False)
