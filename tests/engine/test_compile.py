"""dense-fp under torch.compile: one graph, no value reads, self-attention traced mask-free."""

import torch
import torch.nn.functional as F

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.testing.kits import build_lumina_next, lumina_inputs


def test_dense_fp_compiles_to_one_graph_with_mask_free_self_attention():
    torch._dynamo.reset()
    model = build_lumina_next("tiny")
    inputs = lumina_inputs(model, 4, 4, batch=2, valid_lens=[8, 5])
    with torch.no_grad():
        dense = model(**inputs)[0]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: any break is an error
    with torch.no_grad():
        out = compiled(**inputs)[0]
    assert len(graphs) == 1
    assert torch.allclose(out, dense, atol=2e-5)
    sdpa = [n for n in graphs[0].graph.nodes if n.target is F.scaled_dot_product_attention]
    masks = [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in sdpa]
    assert len(sdpa) == 4
    # blocks alternate self- and cross-attention; self-attention has no mask at all
    assert masks[0] is None and masks[2] is None
    # the caption mask is kept under compile (no value read, no host sync), exact by definition
    assert masks[1] is not None and masks[3] is not None
    torch._dynamo.reset()


def test_a_compiled_model_is_patched_through_the_module_it_wraps():
    from safe_dit import is_safe_dit_applied

    model = build_lumina_next()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    apply_safe_dit(compiled, SafeConfig("dense-fp"))
    assert is_safe_dit_applied(model) and is_safe_dit_applied(compiled)
    remove_safe_dit(compiled)
    assert not is_safe_dit_applied(model)


def test_selective_and_anchor_steps_compile_without_graph_breaks():
    """safe-core under torch.compile: the steps after warm-up (selective, anchor) trace as whole graphs."""
    import safe_dit

    torch._dynamo.reset()
    model = build_lumina_next("tiny")
    inputs = lumina_inputs(model, 4, 4, batch=2)  # all caption tokens valid: no padding mask to keep
    apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=0.5, warmup_steps=1, anchor_interval=2, anchor_growth=0.0,
                                     tail_dense_steps=0, context_forecast=0, reuse_every=0))
    breaks = {}
    with torch.no_grad(), safe_dit.generation(model, num_steps=4) as g:
        model(**inputs)  # warm-up, eager: the partition is built here (value reads and logging allowed)
        for _ in range(3):  # selective, anchor, selective
            kind_before = len(g.report()["steps"])
            explanation = torch._dynamo.explain(model)(**inputs)
            breaks[g.report()["steps"][kind_before]] = explanation.graph_break_count
    remove_safe_dit(model)
    torch._dynamo.reset()
    assert g.report()["steps"] == ["warmup", "selective", "anchor", "selective"]
    assert breaks == {"selective": 0, "anchor": 0}, breaks


def test_safe_core_defaults_compile_to_a_few_graphs_that_match_eager():
    """The per-step state the compiled body reads is a step kind and a few bools; the step index, timesteps and
    forecast weights stay outside the graphs (eager bookkeeping, weights as tensor inputs). Before, every step
    recompiled (12 graphs for 11 calls, then dynamo's recompile limit of 8 sent the model back to eager)."""
    import safe_dit

    def run(steps, compiled):
        torch._dynamo.reset()
        model = build_lumina_next("tiny")
        inputs = lumina_inputs(model, 4, 4, batch=2)
        apply_safe_dit(model, SafeConfig("safe-core"))
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        fn = torch.compile(model, backend=backend) if compiled else model
        outs = []
        with torch.no_grad(), safe_dit.generation(model, num_steps=steps) as g:
            for i in range(steps):
                outs.append(fn(**dict(inputs, timestep=torch.full((2,), 1.0 - i / steps)))[0])
        remove_safe_dit(model)
        torch._dynamo.reset()
        return outs, graphs, g.report()["steps"]

    eager, _, kinds = run(30, compiled=False)
    compiled, graphs, compiled_kinds = run(30, compiled=True)
    assert compiled_kinds == kinds and {"selective", "anchor", "reuse", "tail"} <= set(kinds)
    assert len(graphs) <= 8, len(graphs)  # measured: 7 for 30 steps (warm-up x2, selective x2, anchor, reuse, tail)
    _, graphs_12, _ = run(12, compiled=True)
    assert len(graphs_12) == len(graphs)  # bounded: more steps compile nothing new
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, atol=1e-5, rtol=1e-5)
