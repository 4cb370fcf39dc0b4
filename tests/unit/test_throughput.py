"""Step timing: an evaluation or checkpoint between steps is not counted as step time."""
import engine.observe.throughput as throughput


def test_time_between_a_pause_and_the_next_step_only_is_step_time(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 10.25, 31.0, 32.0]).__next__  # start, step, wait from/to, eval ends, step
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    timer = throughput.StepTimer()
    timer.step_done(samples=8)           # 1 s
    with timer.waiting_for_data():       # 0.25 s waiting for data, in an evaluation that ends at 31 s
        pass
    timer.pause_ended()
    timer.step_done(samples=8)           # 1 s
    read = timer.read_and_reset()
    assert read["time/step_s"] == 1.0 and read["samples_per_s"] == 8.0
    assert read["time/data_wait_s"] == 0.125
