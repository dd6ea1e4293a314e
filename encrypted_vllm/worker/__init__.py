"""The worker side: what runs on RunPod. `main` boots it (`rp_handler.py`);
`config` reads its variables, `models` finds or downloads the model, `boot`
starts vLLM's engine, `job_loop` takes jobs from RunPod, `handler` serves
each, `generation` translates between the wire protocol and vLLM, and
`shaping` paces constant-rate streams. Needs vLLM and the runpod SDK."""
