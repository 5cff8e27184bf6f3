"""The bundled SmolLM2 in float32, switched TP4 -> TP2xPP2 -> PP4 -> TP4 mid-generation (TP4 splits 9 heads /
3 KV heads unevenly, with a replicated KV head), gives the text of an unswitched TP4 run (or differs only after a
near-tie: top-2 logprobs within 0.01 at the first differing token)."""

from remp import LLMEngine, SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def quicksort(xs):"]


def run(switches):
    engine = LLMEngine(dtype="float32", tensor_parallel_size=4, max_model_len=256, kv_cache_memory_gb=0.2)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2))
    outs, step = {}, 0
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
            step += 1
            if step in switches:
                engine.reconfigure(*switches[step])
    finally:
        engine.shutdown()
    return outs


def test_default_model_switches_keep_the_text():
    ref = run({})
    out = run({3: (2, 2), 8: (1, 4), 14: (4, 1)})
    for k in ref:
        a, b = ref[k], out[k]
        if a.token_ids == b.token_ids:
            continue
        i = next(j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
        top2 = sorted((lp.logprob for lp in a.logprobs[i].values()), reverse=True)[:2]
        assert top2[0] - top2[1] < 0.01, f"request {k} diverged at token {i} without a near-tie: {top2}"
