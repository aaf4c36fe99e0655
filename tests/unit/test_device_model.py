"""The device model of experiments (tux3fuse.device.DeviceModel): its arithmetic with time faked, a volume whose
writes go through it, and the mount options that set it."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import opened

import tux3fuse.device as device
from tux3fuse.cli import UsageError, parse_mount_options
from tux3fuse.device import DeviceModel
from tux3fuse.fs import Options, Volume

MS = 1e-3


class FakeClock:
    """time.monotonic and time.sleep of tux3fuse.device: a sleep moves the clock on, nothing waits."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(device.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(device.time, "sleep", fake.sleep)
    return fake


def test_a_batch_completes_at_the_sum_of_its_service_times(clock: FakeClock) -> None:
    model = DeviceModel(latency=5 * MS, bandwidth=1_000_000)  # 1 MB/s: 4096 bytes take 4.096 ms
    start = clock.now
    model.complete([4096, 4096, 8192])
    assert clock.now - start == pytest.approx(3 * 5 * MS + 16384 / 1e6)
    assert clock.slept == [pytest.approx(3 * 5 * MS + 16384 / 1e6)]  # one sleep: the batch was issued at once
    assert model.requests == 3
    assert model.waited == pytest.approx(clock.now - start)


def test_a_second_batch_queues_behind_the_first(clock: FakeClock) -> None:
    model = DeviceModel(latency=2 * MS)
    start = clock.now
    model.complete([4096, 4096])
    first_done = clock.now
    # a second caller issues its batch 1 ms before the first would be served: it waits for the rest of the first,
    # then for its own
    model.free_at = first_done + 1 * MS
    model.complete([4096])
    assert first_done - start == pytest.approx(4 * MS)
    assert clock.now - first_done == pytest.approx(1 * MS + 2 * MS)
    assert model.requests == 3


def test_batches_from_two_threads_are_served_one_after_the_other() -> None:
    model = DeviceModel(latency=40 * MS)  # the real clock: two threads issue a request each at the same moment
    ready = threading.Barrier(2)
    done: list[float] = []

    def issue() -> None:
        ready.wait()
        model.complete([4096])
        done.append(time.monotonic())

    start = time.monotonic()
    threads = [threading.Thread(target=issue) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.requests == 2
    assert max(done) - start >= 2 * 40 * MS - 1 * MS  # the second waited for the first to be served
    assert min(done) - start >= 40 * MS - 1 * MS


def test_an_idle_device_does_not_count_time_that_passed(clock: FakeClock) -> None:
    model = DeviceModel(latency=1 * MS)
    model.complete([4096])
    clock.now += 10.0  # the device was idle meanwhile: its queue is empty, not ten seconds ahead
    at = clock.now
    model.complete([4096])
    assert clock.now - at == pytest.approx(1 * MS)


def test_a_flush_costs_the_latency(clock: FakeClock) -> None:
    model = DeviceModel(latency=5 * MS, bandwidth=50_000_000)
    start = clock.now
    model.complete([0])  # what Device.flush issues
    assert clock.now - start == pytest.approx(5 * MS)
    assert model.service(0) == 5 * MS


def test_bandwidth_zero_means_no_transfer_time(clock: FakeClock) -> None:
    model = DeviceModel(latency=1 * MS, bandwidth=0)
    start = clock.now
    model.complete([1 << 30])  # 1 GiB in one request: only the latency
    assert clock.now - start == pytest.approx(1 * MS)
    assert DeviceModel(latency=0.0, bandwidth=100).service(1000) == pytest.approx(10.0)  # and the other way round


def test_a_model_refuses_negative_settings() -> None:
    with pytest.raises(ValueError):
        DeviceModel(latency=-1 * MS)
    with pytest.raises(ValueError):
        DeviceModel(latency=1 * MS, bandwidth=-1)


def test_a_volume_on_a_modelled_device_commits_through_the_model(image: str) -> None:
    vol = opened(image, device_latency=0.2 * MS, device_bandwidth=200_000_000)
    model = vol.backend.dev.model
    assert isinstance(model, DeviceModel) and model.latency == pytest.approx(0.2 * MS)
    assert vol.backend.dev.slow  # commit writes stay off the event loop
    before = model.requests
    a = vol.create(1, b"f", 0o644)
    data = bytes(range(256)) * 64 * 10  # 160 KiB
    vol.write(a.ino, 0, data)
    vol.release(a.ino)
    assert vol.commit()
    assert model.requests > before  # the commit's writes and flushes went through the model
    assert model.waited > 0
    vol.unmount()
    again = Volume(image, Options(readonly=True))
    try:
        assert again.read(again.lookup(1, b"f").ino, 0, len(data)) == data
    finally:
        again.unmount()


def test_mount_options_set_the_device_model() -> None:
    opts = parse_mount_options("nowriteback,device_latency=5ms,device_bandwidth=50M")
    assert opts["device_latency"] == pytest.approx(5 * MS)
    assert opts["device_bandwidth"] == 50 << 20
    assert opts["writeback"] is False
    assert parse_mount_options("device_latency=0.2ms")["device_latency"] == pytest.approx(0.2 * MS)
    assert parse_mount_options("")["device_latency"] == 0 and parse_mount_options("")["device_bandwidth"] == 0


@pytest.mark.parametrize("text", ["device_latency=-1", "device_latency=abc", "device_bandwidth=0"])
def test_mount_options_refuse_bad_device_settings_with_one_line(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_mount_options(text)
    message = str(err.value)
    assert "\n" not in message and text.split("=")[0] in message
