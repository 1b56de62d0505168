"""HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel): the per-call [B, 1, S, S] pair mask rewritten exactly and never
allocated, the token refiner's pair mask likewise; safe-core on a batch of different caption lengths over the
(frames, h, w) grid; what is refused. HunyuanVideo (HunyuanVideoTransformer3DModel): the same for its [B, 1, 1, N + T]
key mask and its refiner's pair mask with the first column set."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.cli import main
from safe_dit.inspection.audit import trace_forward
from safe_dit.testing.hunyuan_video import build_hunyuan_video, build_hunyuan_video_pipeline, hunyuan_video_inputs
from safe_dit.testing.hunyuan_video15 import (
    build_hunyuan_video15,
    build_hunyuan_video15_pipeline,
    hunyuan_video15_inputs,
)

from helpers import SdpaSpy, forward, processors, stock_vs_dense_fp

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _joint_length(inputs) -> int:
    """S = video tokens + every caption slot (Qwen2.5-VL, ByT5, image-embed) of the joint sequence."""
    f, h, w = inputs["hidden_states"].shape[2:]
    return f * h * w + sum(inputs[k].shape[1] for k in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                         "image_embeds"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens,glyph,image", [([8, 3], [0, 2], False), ([8, 8], [0, 0], False), ([2, 7], [4, 1], True),
                                              ([8], [4], True), ([5], [0], False)],
                         ids=["t2v-split", "t2v-slice", "i2v-split", "i2v-all-valid", "t2v-one"])
def test_dense_fp_equals_stock_with_no_mask_on_the_flash_kernel(lens, glyph, image, dtype):
    model = build_hunyuan_video15(dtype=dtype)
    inputs = hunyuan_video15_inputs(model, 3, 4, batch=len(lens), valid_lens=lens, glyph_valid=glyph, image=image,
                                    seed=len(lens) + sum(lens))
    dense, fast, stock_masks, masks = stock_vs_dense_fp(model, inputs)
    s = _joint_length(inputs)
    assert stock_masks and all(m is not None for m in stock_masks)  # the stock model masks every call
    assert sum(tuple(m.shape[-2:]) == (s, s) for m in stock_masks) == 2  # the [B, 1, S, S] pair mask, each block
    assert masks and all(m is None for m in masks)
    scale = 1.0 if dtype == torch.float32 else dense.abs().max().item()  # fp32: absolute, bf16: relative
    assert (fast - dense).abs().max().item() <= TOL[dtype] * scale


def test_every_row_of_every_block_equals_stock_padding_rows_included():
    """Both streams of every block, the caption padding rows too (zero attention, as SDPA gives an all-False row)."""
    model = build_hunyuan_video15()
    inputs = hunyuan_video15_inputs(model, 3, 4, batch=2, valid_lens=[8, 3], glyph_valid=[1, 3])

    def outputs():
        seen = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in model.transformer_blocks]
        hooks.append(model.context_embedder.register_forward_hook(lambda _m, _i, out: seen.append((out,))))
        forward(model, inputs)
        for h in hooks:
            h.remove()
        return [t for out in seen for t in out]

    stock = outputs()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast = outputs()
    remove_safe_dit(model)
    assert len(stock) == len(fast) == 5
    assert max((a - b).abs().max().item() for a, b in zip(stock, fast)) <= 1e-5


class LiveBytes(TorchDispatchMode):
    """Every tensor storage the ops under it allocate (storages alive before, the weights and inputs, are not
    counted): the bytes alive at once (peak), the bytes allocated in all, and the shapes made."""

    def __init__(self, *existing):
        super().__init__()
        self.live, self.current, self.peak, self.total, self.shapes = {}, 0, 0, 0, []
        self.known = {t.untyped_storage().data_ptr() for group in existing for t in group}

    def _free(self, ptr):
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if size and ptr not in self.live and ptr not in self.known:
                    self.live[ptr] = size
                    self.current += size
                    self.total += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, ptr)
        return out


def test_the_pair_mask_is_never_allocated_and_peak_memory_is_below_stock():
    model = build_hunyuan_video15(num_layers=1)
    inputs = hunyuan_video15_inputs(model, 16, 16, batch=2, frames=4, valid_lens=[8, 3], glyph_valid=[0, 2])
    s = _joint_length(inputs)  # 1040

    existing = [list(model.parameters()), list(model.buffers()),
                [t for t in inputs.values() if isinstance(t, torch.Tensor)]]

    def measure():
        with torch.no_grad(), LiveBytes(*existing) as live:
            out = model(**inputs)[0]
        return out, live

    dense, stock = measure()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast, fp = measure()
    remove_safe_dit(model)
    pair = (2, 1, s, s)
    assert stock.shapes.count(pair) >= 2 and not any(shape[-2:] == (s, s) for shape in fp.shapes)  # seen, never made
    mask_bytes = 2 * s * s  # one boolean [B, 1, S, S]
    assert fp.peak < stock.peak - mask_bytes, (fp.peak, stock.peak)
    assert fp.total < stock.total - 2 * mask_bytes  # two pair masks (one per block) never made
    assert (fast - dense).abs().max().item() <= 1e-5


def test_verdicts_and_the_kept_masks_are_exact_too():
    model = build_hunyuan_video15()
    inputs = hunyuan_video15_inputs(model, 2, 3, batch=2, valid_lens=[8, 3])
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    verdicts = {(name.split(".")[0], verdict) for name, verdict in
                ((c["module"], c["verdict"]) for c in trace_forward(model, inputs))}
    remove_safe_dit(model)
    assert verdicts == {("context_embedder", "rewritten: split-batch (exact)"),
                        ("transformer_blocks", "rewritten: split-batch (exact)")}
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))  # masks kept as the stock code ships them
    with SdpaSpy() as spy:
        kept = forward(model, inputs)
    remove_safe_dit(model)
    assert spy.masks and all(m is not None for m in spy.masks)
    assert (kept - dense).abs().max().item() <= 1e-5


def test_unknown_masks_are_kept_or_refused():
    model = build_hunyuan_video15()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn
    x = torch.randn(2, 5, refiner.to_q.in_features)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)  # no outer product: kept
    with torch.no_grad(), SdpaSpy() as spy:
        out = refiner(x, attention_mask=causal)
    stock = AttnStock(refiner)
    assert spy.masks[0] is not None and (out - stock(x, causal)).abs().max() <= 1e-6
    block = model.transformer_blocks[0].attn
    with pytest.raises(SafeDitError, match="knows only the"), torch.no_grad():
        block(torch.randn(1, 6, 32), encoder_hidden_states=torch.randn(1, 3, 32),
              attention_mask=torch.ones(1, 1, 9, 9, dtype=torch.bool))
    remove_safe_dit(model)


class AttnStock:
    """The refiner attention module run with its stock processor."""

    def __init__(self, attn):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.attn, self.proc = attn, AttnProcessor2_0()

    def __call__(self, x, mask):
        with torch.no_grad():
            return self.proc(self.attn, x, attention_mask=mask)


def test_remove_restores_the_stock_model_exactly():
    model = build_hunyuan_video15()
    before = processors(model)
    inputs = hunyuan_video15_inputs(model, 2, 3, batch=2, valid_lens=[8, 3])
    ref = forward(model, inputs)
    for mode in ("dense-fp", "safe-core"):
        apply_safe_dit(model, SafeConfig(mode))
        remove_safe_dit(model)
        after = processors(model)
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert not model.x_embedder._forward_hooks and not model.proj_out._forward_hooks
    assert torch.equal(forward(model, inputs), ref)


def _steps(model, steps_inputs, config):
    apply_safe_dit(model, config)
    with torch.no_grad(), safe_dit.generation(model, num_steps=len(steps_inputs)) as g, SdpaSpy() as spy:
        outs = [model(**inputs)[0] for inputs in steps_inputs]
    remove_safe_dit(model)
    return outs, g, spy


def _trajectory(model, lens, n=6):
    base = hunyuan_video15_inputs(model, 4, 4, batch=len(lens), frames=3, valid_lens=lens, glyph_valid=[0, 2])
    noise = torch.randn_like(base["hidden_states"])
    return [dict(base, hidden_states=base["hidden_states"] * (1 - 0.1 * i) + 0.1 * i * noise,
                 timestep=base["timestep"] * 0 + 1000 * (1 - i / n)) for i in range(n)]


@pytest.mark.parametrize("lens", [[8, 3], [8, 8]], ids=["different", "equal"])
def test_safe_core_on_a_batch_of_two_captions_over_the_space_time_grid(lens):
    model = build_hunyuan_video15()
    steps = _trajectory(model, lens)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0, reuse_every=0)
    full, g1, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, **sched))
    assert "selective" in g1.report()["steps"]
    assert max((o - d).abs().max().item() for o, d in zip(full, dense_fp)) <= 1e-5  # keep 1 == dense-fp
    sparse, g2, spy = _steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, **sched))
    report = g2.report()
    assert report["steps"] == ["warmup", "selective", "selective", "anchor", "selective", "selective"]
    assert report["tokens_per_step"][0] == 48 and report["tokens_per_step"][1] == 12  # 3 x 4 x 4 tokens, a quarter
    assert g2._gen.grid == (3, 4, 4)
    assert spy.masks and all(m is None for m in spy.masks)
    assert all(torch.isfinite(o).all() for o in sparse)
    assert not torch.allclose(sparse[1], dense_fp[1], atol=1e-4)  # context rows reuse the anchor
    assert (sparse[3] - dense_fp[3]).abs().max().item() <= 1e-5  # the anchor is a dense step


def test_pcsp_ignores_caption_padding():
    """Changing a sample's padded caption states changes neither the output nor the partition."""
    model = build_hunyuan_video15()
    a = hunyuan_video15_inputs(model, 4, 4, batch=2, frames=2, valid_lens=[8, 3], seed=3)
    b = dict(a, encoder_hidden_states=a["encoder_hidden_states"].clone())
    b["encoder_hidden_states"][1, 3:] = torch.randn(5, b["encoder_hidden_states"].shape[-1])  # sample 1's padding
    index, outs = [], []
    for inputs in (a, b):
        config = SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=3)
        out, g, _ = _steps(model, [inputs] * 3, config)
        index.append(g._gen.index.clone())
        outs.append(out[-1])
    assert torch.equal(index[0], index[1])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[0].abs().max()


def test_selective_steps_do_a_fraction_of_the_block_work():
    """FLOPs of the dual-stream blocks at a selective step (the caption embedders' fixed cost, ByT5's 2048-wide
    projection above all, dominates a tiny model's total and is the same at every step)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_hunyuan_video15()
    inputs = hunyuan_video15_inputs(model, 6, 6, batch=2, frames=2, valid_lens=[8, 3])
    flops = {}
    for keep in (1.0, 0.25):
        apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=keep, warmup_steps=1, anchor_interval=2,
                                         tail_dense_steps=0))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3) as g:
            model(**inputs)  # warm-up (also the first anchor)
            with FlopCounterMode(display=False) as counter:
                model(**inputs)  # selective
        remove_safe_dit(model)
        assert g.report()["steps"][1] == "selective"
        blocks = [v for k, v in counter.get_flop_counts().items() if re.fullmatch(r".*\.transformer_blocks\.\d+", k)]
        assert len(blocks) == 2
        flops[keep] = sum(sum(v.values()) for v in blocks)
    assert flops[0.25] < 0.5 * flops[1.0]


def test_refusals():
    model = build_hunyuan_video15()
    apply_safe_dit(model, SafeConfig("safe-core", warmup_steps=1))
    i2v = hunyuan_video15_inputs(model, 2, 2, image=True)
    with pytest.raises(SafeDitError, match="text-to-video only"), torch.no_grad(), \
            safe_dit.generation(model, num_steps=2):
        model(**i2v)
    bad = hunyuan_video15_inputs(model, 2, 2)
    bad["encoder_attention_mask"] = bad["encoder_attention_mask"][:, :4]
    with pytest.raises(SafeDitError, match="encoder_attention_mask must be"), torch.no_grad(), \
            safe_dit.generation(model, num_steps=2):
        model(**bad)
    remove_safe_dit(model)


def _guided_call():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 8, 32, generator=g),
                prompt_embeds_mask=torch.tensor([[1.0] * 6 + [0.0] * 2]),
                negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                negative_prompt_embeds_mask=torch.tensor([[1.0] * 2 + [0.0] * 6]),
                prompt_embeds_2=torch.randn(1, 4, 24, generator=g), prompt_embeds_mask_2=torch.zeros(1, 4),
                negative_prompt_embeds_2=torch.randn(1, 4, 24, generator=g),
                negative_prompt_embeds_mask_2=torch.zeros(1, 4),
                height=16, width=16, num_frames=2, num_inference_steps=8, output_type="latent")


def test_safe_core_and_safe_sw_follow_the_guiders_two_calls_per_step():
    """The guider's CFG (a conditional, then an unconditional call per step, captions of different lengths): dense-fp
    equals stock; safe-core with keep 1 equals dense-fp; safe-sw with one gamma everywhere equals safe-core (the
    unconditional output it returns is u itself), with a map it differs."""
    pipe = build_hunyuan_video15_pipeline()
    pipe.guider.guidance_scale = 6.0
    kw = _guided_call()

    def run(config):
        if config is None:
            remove_safe_dit(pipe)
        else:
            apply_safe_dit(pipe, config)
        with SdpaSpy() as spy:
            out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
        rt = safe_dit.api.runtime_of(pipe)
        return out, (rt.last_report if rt is not None else None), spy

    stock, _, _ = run(None)
    dense_fp, _, _ = run(SafeConfig("dense-fp"))
    sched = dict(warmup_steps=2, anchor_interval=3, tail_dense_steps=1, anchor_growth=0.0, reuse_every=0)
    full, report, _ = run(SafeConfig("safe-core", keep_ratio=1.0, **sched))
    core, core_report, spy = run(SafeConfig("safe-core", keep_ratio=0.25, **sched))
    flat, _, _ = run(SafeConfig("safe-sw", keep_ratio=0.25, cfg_context=6.0, cfg_sensitive=6.0, **sched))
    mapped, _, _ = run(SafeConfig("safe-sw", keep_ratio=0.25, cfg_context=4.0, cfg_sensitive=8.0, **sched))
    remove_safe_dit(pipe)
    assert (dense_fp - stock).abs().max().item() <= 1e-5
    assert "selective" in report["steps"] and (full - dense_fp).abs().max().item() <= 1e-5
    assert core_report["tokens_per_step"][:3] == [128, 128, 32]
    assert len(spy.masks) == 2 * 8 * 3 + 2 * 2  # 2 calls x 8 steps x 3 attentions, + PCSP's mass on call 0's warm-up
    assert all(m is None for m in spy.masks)
    assert not torch.allclose(core, dense_fp, atol=1e-4)
    assert (flat - core).abs().max().item() <= 1e-5 * core.abs().max().item()
    assert not torch.allclose(mapped, core, atol=1e-4)
    pipe.guider._start = 0.5  # CFG for half the trajectory: one call per step, then two
    apply_safe_dit(pipe, SafeConfig("safe-core"))
    with pytest.raises(SafeDitError, match="guides from 0.5"):
        pipe(**kw)
    remove_safe_dit(pipe)


def test_cli_audit():
    assert main(["audit", "--model", "hunyuan-video-1.5", "--height-tokens", "3", "--width-tokens", "4"]) == 0


# -- HunyuanVideo (1.0): the [B, 1, 1, N + T] key mask of every dual- and single-stream block ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens", [[8, 3], [8, 8], [5], [2, 7, 7]], ids=["split", "all-valid", "slice", "split-3"])
def test_v1_dense_fp_equals_stock_with_no_mask_on_the_flash_kernel(lens, dtype):
    model = build_hunyuan_video(dtype=dtype)
    inputs = hunyuan_video_inputs(model, 3, 4, batch=len(lens), valid_lens=lens, seed=sum(lens))
    dense, fast, stock_masks, masks = stock_vs_dense_fp(model, inputs)
    n = 2 * 3 * 4 + 8  # video tokens + caption slots
    assert sum(tuple(m.shape) == (len(lens), 1, 1, n) for m in stock_masks) == 3  # every dual and single block
    assert masks and all(m is None for m in masks)
    scale = 1.0 if dtype == torch.float32 else dense.abs().max().item()
    assert (fast - dense).abs().max().item() <= TOL[dtype] * scale


def test_v1_every_row_equals_stock_and_the_refiner_padding_rows_see_the_first_token():
    model = build_hunyuan_video()
    inputs = hunyuan_video_inputs(model, 3, 4, batch=2, valid_lens=[8, 3])
    seen = []
    model.context_embedder.register_forward_hook(lambda _m, _i, out: seen.append(out))
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.register_forward_hook(lambda _m, _i, out: seen.extend(out))
    forward(model, inputs)
    stock, seen[:] = list(seen), []
    apply_safe_dit(model, SafeConfig("dense-fp"))
    verdicts = {(c["module"].split(".")[0], c["verdict"]) for c in trace_forward(model, inputs)}
    seen.clear()
    forward(model, inputs)
    remove_safe_dit(model)
    assert verdicts == {(where, "rewritten: split-batch (exact)")
                        for where in ("context_embedder", "transformer_blocks", "single_transformer_blocks")}
    assert len(seen) == len(stock) == 7
    assert max((a - b).abs().max().item() for a, b in zip(stock, seen)) <= 1e-5


def test_v1_safe_core_on_a_batch_of_two_captions_over_the_space_time_grid():
    model = build_hunyuan_video()
    base = hunyuan_video_inputs(model, 4, 4, batch=2, frames=3, valid_lens=[8, 3])
    noise = torch.randn_like(base["hidden_states"])
    steps = [dict(base, hidden_states=base["hidden_states"] * (1 - 0.1 * i) + 0.1 * i * noise,
                  timestep=base["timestep"] * 0 + 1000 * (1 - i / 6)) for i in range(6)]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0, reuse_every=0)
    full, g1, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, **sched))
    assert "selective" in g1.report()["steps"]
    assert max((o - d).abs().max().item() for o, d in zip(full, dense_fp)) <= 1e-5  # keep 1 == dense-fp
    sparse, g2, spy = _steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, **sched))
    report = g2.report()
    assert report["tokens_per_step"][:2] == [48, 12] and g2._gen.grid == (3, 4, 4)
    assert spy.masks and all(m is None for m in spy.masks)
    assert not torch.allclose(sparse[1], dense_fp[1], atol=1e-4)
    assert (sparse[3] - dense_fp[3]).abs().max().item() <= 1e-5  # the anchor is a dense step


def test_v1_refusals_true_cfg_and_remove():
    model = build_hunyuan_video()
    before = processors(model)
    with pytest.raises(SafeDitError, match="safe-sw is not available for HunyuanVideo"):
        apply_safe_dit(model, SafeConfig("safe-sw"))
    with pytest.raises(SafeDitError, match="text-to-video only"):
        apply_safe_dit(build_hunyuan_video(image_condition_type="token_replace"), SafeConfig("safe-core"))
    i2v = build_hunyuan_video(image_condition_type="latent_concat", in_channels=9)  # dense-fp runs image-to-video
    inputs = hunyuan_video_inputs(i2v, 2, 3, batch=2, valid_lens=[8, 3])
    dense, fast, _, masks = stock_vs_dense_fp(i2v, inputs)
    assert all(m is None for m in masks) and (fast - dense).abs().max().item() <= 1e-5
    pipe = build_hunyuan_video_pipeline(model)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g),
              prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
              pooled_prompt_embeds=torch.randn(1, 20, generator=g),
              negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
              negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
              negative_pooled_prompt_embeds=torch.randn(1, 20, generator=g), true_cfg_scale=4.0,
              height=16, width=16, num_frames=5, num_inference_steps=4, output_type="latent")

    def run(config):
        apply_safe_dit(pipe, config)
        with SdpaSpy() as spy:
            out = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
        return out, safe_dit.api.runtime_of(pipe).last_report, spy

    dense_fp, _, _ = run(SafeConfig("dense-fp"))  # true CFG: a conditional and an unconditional call per step
    sched = dict(warmup_steps=1, anchor_interval=2, tail_dense_steps=0, anchor_growth=0.0, reuse_every=0)
    full, report, _ = run(SafeConfig("safe-core", keep_ratio=1.0, **sched))
    sparse, _, spy = run(SafeConfig("safe-core", keep_ratio=0.25, **sched))
    remove_safe_dit(pipe)
    after = processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not model._forward_pre_hooks and not model._forward_hooks and not model.proj_out._forward_hooks
    assert "encode_prompt" not in vars(pipe)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    assert (dense_fp - ref).abs().max().item() <= 1e-5
    assert "selective" in report["steps"] and (full - dense_fp).abs().max().item() <= 1e-5
    assert len(spy.masks) == 2 * 4 * 4 + 3 and all(m is None for m in spy.masks)  # + PCSP's mass, warm-up call 0
    assert not torch.allclose(sparse, dense_fp, atol=1e-4)


def test_v1_cli_audit():
    assert main(["audit", "--model", "hunyuan-video", "--height-tokens", "3", "--width-tokens", "4"]) == 0


@pytest.mark.parametrize("name,modes,batch", [("hunyuan-video-1.5", 4, "1, two calls per step (CFG)"),
                                              ("hunyuan-video", 3, "1 (guidance-distilled)")])
def test_bench_e2e_quick(name, modes, batch, tmp_path):
    """bench e2e drives both pipelines (the 1.5 guider's CFG at --guidance: two calls per step, safe-sw included)
    with the dense-fp / dense check inside the run."""
    import json

    path = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", name, "--quick", "--no-progress", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["batch"] == batch and len({r["mode"] for r in result["rows"]}) == modes
    assert all(r["status"] == "ok" for r in result["rows"])
    assert all(r["rel_err_vs_dense_short_call"] <= 1e-5 for r in result["rows"] if r["mode"] == "dense-fp")


@pytest.mark.parametrize("name", ["hunyuan-video-1.5", "hunyuan-video"])
def test_sensitive_rows_carry_their_own_rope_rows(name):
    """The same input at every step: the anchor's K/V are this step's, so a selective step reproduces the dense output
    on every row only if each scattered sensitive row is rotated with its own row of the 3-D RoPE table."""
    build, make = (build_hunyuan_video15, hunyuan_video15_inputs) if name.endswith("1.5") else \
        (build_hunyuan_video, hunyuan_video_inputs)
    model = build()
    inputs = make(model, 4, 5, batch=2, frames=3, valid_lens=[8, 3])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense = forward(model, inputs)
    remove_safe_dit(model)
    config = SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=4, tail_dense_steps=0,
                        context_forecast=0, reuse_every=0)
    outs, g, _ = _steps(model, [inputs] * 3, config)
    index = g._gen.index
    assert g.report()["steps"] == ["warmup", "selective", "selective"] and index.shape == (2, 18)
    assert not torch.equal(index[0], torch.arange(18))  # scattered over the 3 x 4 x 5 grid, not a prefix
    assert max((o - dense).abs().max().item() for o in outs[1:]) <= 1e-5
