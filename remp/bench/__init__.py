"""`remp bench serve`: an async load generator and reporter for any OpenAI-compatible server (remp or vLLM).

Modules: `datasets` (what to send, and when), `serve` (the streaming client and CLI), `metrics` (pure arithmetic
on per-request timings), `timeline` (topology polling and the PNG). Also `results`: the one writer of
the result files of the scripts under bench/, with their envelope (date, commit, machine, dtype, command)."""
