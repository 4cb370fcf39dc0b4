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


def test_the_throughput_hook_times_the_wait_for_each_batch_and_adds_rates_and_memory(monkeypatch):
    # start; batch 1 asked for at 0.5 s, had at 1.5; step done at 2; batch 2 asked for at 2, had at
    # 2.5; step done at 4; then the batches run out
    clock = iter([0.0, 0.5, 1.5, 2.0, 2.0, 2.5, 4.0, 5.0, 5.0]).__next__
    monkeypatch.setattr(throughput.time, "perf_counter", clock)

    class Flops:
        def rates(self, samples_per_s):
            return {"tflops_per_s": samples_per_s / 1000}

    hook = throughput.Throughput(samples_per_step=16, flops=Flops())
    batches = hook.batches(iter(["first", "second"]), first_step=1)
    for step in (1, 2):
        next(batches)
        hook.step_done(step, {}, skipped=False)
    values = hook.scalars(step=2)
    assert values["samples_per_s"] == 8.0 and values["time/step_s"] == 2.0
    assert values["time/data_wait_s"] == 0.75 and values["tflops_per_s"] == 0.008
    assert set(throughput.memory_gb()) <= set(values)
    assert list(batches) == []   # passed on to the end
