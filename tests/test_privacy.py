"""Nothing in the clear: a canary string sent in every kind of request, good
and bad, never shows up in an error or in any line the worker process wrote
(its own, the runpod SDK's, the engine's); neither does a key or a
ciphertext."""

from __future__ import annotations

import json

from cryptography.fernet import Fernet
from jobs import GREEDY

CANARY = "CANARY-4f1c9e"
FERNET_TOKEN_PREFIX = "gAAAAA"  # version byte and a present-day timestamp


def test_no_canary_key_or_ciphertext_in_any_log_or_error(live, key, retired_key):
    with live.client() as endpoint:
        endpoint.run_sync(f"{CANARY} in a prompt", sampling_params=GREEDY)
        endpoint.run_sync(
            messages=[
                {"role": "system", "content": CANARY},
                {"role": "user", "content": f"{CANARY} in a chat"},
            ],
            sampling_params=GREEDY,
        )
        stream = endpoint.stream(
            f"{CANARY} cancelled", sampling_params={**GREEDY, "max_tokens": 400}
        )
        next(stream)
        stream.close()

    fernet = Fernet(key.encode())
    refused = [
        {"prompt": "x", CANARY: 1},
        {"prompt": "x", "sampling_params": {CANARY: 1}},
        {"prompt": "x", "sampling_params": {"max_tokens": CANARY}},
        {"messages": [{"role": CANARY, "content": CANARY}]},
        {"prompt": f"{CANARY} " * 3000},
        [CANARY],
    ]
    job_inputs = [{"ciphertext": fernet.encrypt(json.dumps(p).encode()).decode()} for p in refused]
    job_inputs += [
        {"ciphertext": CANARY},
        {"prompt": CANARY},
        {"ciphertext": Fernet(Fernet.generate_key()).encrypt(CANARY.encode()).decode()},
    ]
    failures = [live.failure_of(live.submit_raw(job_input)) for job_input in job_inputs]

    assert all(failure.code is not None for failure in failures)
    assert not [str(failure) for failure in failures if CANARY in str(failure)]
    log = live.worker_log()
    assert all(failure.job_id in log for failure in failures)  # the right log
    assert CANARY not in log
    assert key not in log and retired_key not in log
    assert FERNET_TOKEN_PREFIX not in log
