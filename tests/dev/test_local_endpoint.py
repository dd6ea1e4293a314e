"""The loopback RunPod endpoint: RunPod's own SDK client against it with the
real worker, and its queue semantics with this test playing the worker's
part over the same HTTP calls the SDK worker makes."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from encrypted_vllm.dev import local_endpoint
from encrypted_vllm.wire import channel, protocol
from tests.jobs import GREEDY


def test_the_runpod_sdk_client_streams_and_reads_a_job(live, key):
    import runpod

    runpod.endpoint_url_base = f"{live.serving.base_url}/v2"
    endpoint = runpod.Endpoint(live.endpoint.endpoint_id, api_key=live.endpoint.api_key)
    sealer = channel.Channel(key)
    request = protocol.validate_request(prompt="Sanity check.", sampling_params=GREEDY)

    job = endpoint.run({"input": sealer.seal_request(request)})
    streamed = [sealer.open_item(output) for output in job.stream()]

    assert job.status() == "COMPLETED"
    stored = [sealer.open_item(output) for output in job.output()]
    assert stored == streamed
    assert streamed[-1].usage.completion_tokens == 24
    assert endpoint.health()["jobs"]["completed"] >= 1


class Peer:
    """This test as a client and as the worker, over loopback HTTP."""

    def __init__(self, serving: local_endpoint.Serving):
        key = serving.endpoint.api_key
        self.client = httpx.Client(
            base_url=serving.url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        # The SDK worker sends its key bare, and posts JSON labelled as form data.
        self.worker = httpx.Client(base_url=serving.url, headers={"Authorization": key}, timeout=10)

    def run(self, job_input=None, **body) -> str:
        response = self.client.post("/run", json={"input": job_input or {"x": 1}, **body})
        response.raise_for_status()
        return response.json()["id"]

    def status(self, job_id: str) -> dict:
        return self.client.get(f"/status/{job_id}").json()

    def take(self, worker_id: str = "w1") -> httpx.Response:
        return self.worker.get(f"/job-take/{worker_id}?gpu=LOCAL&job_in_progress=0")

    def post(self, kind: str, job_id: str, body: dict) -> None:
        response = self.worker.post(
            f"/{kind}/w1/{job_id}?gpu=LOCAL&isStream=false",
            content=protocol.json.dumps(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response.raise_for_status()


@pytest.fixture
def peer():
    endpoint = local_endpoint.LocalEndpoint(hold_s=0.2, execution_timeout_s=None)
    with local_endpoint.Serving(endpoint) as serving:
        yield Peer(serving)


def test_a_job_goes_from_queue_to_worker_to_stream_to_result(peer):
    job_id = peer.run({"ciphertext": "abc"}, policy={"ttl": 60000})
    assert peer.status(job_id)["status"] == "IN_QUEUE"

    taken = peer.take()
    assert taken.json() == {"id": job_id, "input": {"ciphertext": "abc"}}
    assert peer.status(job_id)["status"] == "IN_PROGRESS"

    peer.post("job-stream", job_id, {"output": {"ciphertext": "one"}})
    peer.post("job-stream", job_id, {"output": {"ciphertext": "two"}})
    first = peer.client.get(f"/stream/{job_id}").json()
    assert first == {
        "id": job_id,
        "status": "IN_PROGRESS",
        "stream": [{"output": {"ciphertext": "one"}}, {"output": {"ciphertext": "two"}}],
    }
    assert peer.client.get(f"/stream/{job_id}").json()["stream"] == []  # drained

    peer.post("job-done", job_id, {"output": [{"ciphertext": "one"}, {"ciphertext": "two"}]})
    status = peer.status(job_id)
    assert status["status"] == "COMPLETED" and status["workerId"] == "w1"
    assert status["output"] == [{"ciphertext": "one"}, {"ciphertext": "two"}]
    assert peer.client.get(f"/stream/{job_id}").json()["stream"] == []
    assert peer.client.get("/health").json()["jobs"]["completed"] == 1


def test_a_held_stream_poll_answers_when_the_worker_posts(peer):
    job_id = peer.run()
    peer.take()
    poster = threading.Timer(
        0.3, peer.post, ("job-stream", job_id, {"output": {"ciphertext": "late"}})
    )
    poster.start()

    started = time.monotonic()
    body = peer.client.get(f"/stream/{job_id}?wait=5000").json()

    assert body["stream"] == [{"output": {"ciphertext": "late"}}]
    assert 0.2 < time.monotonic() - started < 5
    poster.join()


def test_a_failed_job_carries_the_workers_error(peer):
    job_id = peer.run()
    peer.take()
    peer.post("job-done", job_id, {"error": "INVALID_INPUT: request has an unknown field"})
    status = peer.status(job_id)
    assert status["status"] == "FAILED"
    assert status["error"] == "INVALID_INPUT: request has an unknown field"


def test_cancelling_a_queued_job_keeps_it_from_any_worker(peer):
    job_id = peer.run()
    assert peer.client.post(f"/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert peer.take().status_code == 204


def test_cancelling_a_running_job_stops_it_on_its_worker(peer):
    job_id = peer.run()
    peer.take()
    peer.client.post(f"/cancel/{job_id}")
    stop = peer.worker.get("/job-stop/w1?gpu=LOCAL")
    assert stop.json() == {"jobsToStop": [job_id]}
    peer.post("job-done", job_id, {"output": []})  # too late: ignored
    assert peer.status(job_id)["status"] == "CANCELLED"


def test_a_job_past_its_execution_timeout_is_timed_out_and_stopped(peer):
    job_id = peer.run(policy={"executionTimeout": 200})
    peer.take()
    time.sleep(0.4)
    assert peer.status(job_id)["status"] == "TIMED_OUT"
    assert peer.worker.get("/job-stop/w1?gpu=LOCAL").json() == {"jobsToStop": [job_id]}


def test_the_jobs_of_a_worker_gone_silent_fail_as_lost_with_it():
    endpoint = local_endpoint.LocalEndpoint(hold_s=0.2, execution_timeout_s=None, lost_after_s=1)
    with local_endpoint.Serving(endpoint) as serving:
        peer = Peer(serving)
        silent, alive = peer.run(), peer.run()
        assert peer.take("w1").json()["id"] == silent  # w1 then says nothing more
        assert peer.take("w2").json()["id"] == alive
        queued = peer.run()
        until = time.monotonic() + 2.5
        while time.monotonic() < until:  # w2 pings on
            peer.worker.get("/ping/w2?gpu=LOCAL").raise_for_status()
            time.sleep(0.1)

        lost = peer.status(silent)
        assert (lost["status"], lost["error"]) == ("FAILED", "worker lost: not seen for 1 s")
        assert protocol.ProtocolError.parse(lost["error"]) is None  # none of the worker's codes
        assert peer.status(alive)["status"] == "IN_PROGRESS"
        assert peer.status(queued)["status"] == "IN_QUEUE"  # a queued job waits for a worker
        peer.post("job-done", silent, {"output": ["late"]})  # w1 after all: dropped
        assert peer.status(silent)["status"] == "FAILED"
        assert peer.worker.get("/job-stop/w1?gpu=LOCAL").json() == {"jobsToStop": [silent]}


def test_runsync_waits_for_the_result_or_answers_in_progress(peer):
    def work() -> None:
        taken = peer.take().json()
        peer.post("job-done", taken["id"], {"output": ["done"]})

    threading.Timer(0.2, work).start()
    done = peer.client.post("/runsync", json={"input": {"x": 1}}).json()
    assert (done["status"], done["output"]) == ("COMPLETED", ["done"])
    assert done["id"].startswith("sync-")

    pending = peer.client.post("/runsync?wait=1000", json={"input": {"x": 2}}).json()
    assert pending["status"] == "IN_QUEUE"


def test_requests_without_a_valid_key_or_endpoint_are_refused(peer):
    url = str(peer.client.base_url)
    assert httpx.post(f"{url}/run", json={"input": {}}).status_code == 401
    wrong = httpx.post(f"{url}/run", json={"input": {}}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    elsewhere = url.replace("/v2/local", "/v2/other")
    key = {"Authorization": peer.worker.headers["Authorization"]}
    assert httpx.post(f"{elsewhere}/run", json={"input": {}}, headers=key).status_code == 404
    assert peer.client.get("/status/no-such-job").status_code == 404
    assert peer.client.post("/run", json={"no": "input"}).status_code == 400
