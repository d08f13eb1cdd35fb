"""Run-level gauges for the Ray dashboard and Prometheus: `gapray_run_*`, tagged with the run's name.

Ray's metrics agent forgets a gauge value that its process has not set again within two report intervals
(`ray._private.telemetry.open_telemetry_metric_recorder`: the TTL is 2 x metrics_report_interval_ms), and a
process only reports a value when it is set. A value set once per phase was therefore visible for ~2 s with
a 1 s report interval: a Prometheus scrape every 15 s (Ray's default setup) saw almost none of them.

So the values live in one small detached actor per run, `RunGauges`, which sets every value it holds again
at half the report interval for the life of the run, and for `linger_s` after the run ends (so the last
measure's values reach a scraper too; then it exits by itself). Without Ray every call is a no-op.
"""

from __future__ import annotations

import threading
import time

NAMES = {"policy_version": "policy version the run serves", "non_unification": "non-unification, latest measure",
         "generation_accuracy": "oracle generation accuracy, latest measure", "sft_samples": "SFT rows, this round",
         "dpo_pairs": "DPO pairs, this round", "discard_pool": "prompts in the discard pool",
         "replay_admitted": "prompts admitted by the latest replay", "gate_precision": "audited precision",
         "train_loss": "last logged training loss", "phases_completed": "phases completed"}


class GaugeKeeper:
    """The actor's body: holds the latest value of each gauge and re-sets them all on a timer."""

    def __init__(self, run: str, period_s: float | None = None):
        import ray
        from ray.util import metrics

        self.tags = {"run": run}
        self.gauges = {n: metrics.Gauge(f"gapray_run_{n}", d, tag_keys=("run",)) for n, d in NAMES.items()}
        self.values: dict[str, float] = {}
        self.period_s = period_s or max(ray._config.metrics_report_interval_ms(), 1000) / 2000
        self.exit_at: float | None = None  # set by close(); a new run under the same name clears it
        self.lock = threading.Lock()
        threading.Thread(target=self._refresh, daemon=True).start()

    def set(self, values: dict[str, float]) -> None:
        with self.lock:
            self.values.update({k: float(v) for k, v in values.items() if k in self.gauges and v is not None})
            self.exit_at = None
            self._set_all()

    def get(self) -> dict[str, float]:
        with self.lock:
            return dict(self.values)

    def close(self, linger_s: float) -> None:
        with self.lock:
            self.exit_at = time.monotonic() + linger_s

    def _set_all(self) -> None:
        for name, value in self.values.items():
            self.gauges[name].set(value, tags=self.tags)

    def _refresh(self) -> None:
        import ray

        while True:
            time.sleep(self.period_s)
            with self.lock:
                self._set_all()
                done = self.exit_at is not None and time.monotonic() >= self.exit_at
            if done:
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


class RunGauges:
    """The driver's side: `set(name=value, ...)` during the run, `close()` at its end."""

    def __init__(self, run: str, actor_name: str, linger_s: float = 60.0):
        self.keeper, self.linger_s = None, linger_s
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            self.keeper = ray.remote(GaugeKeeper).options(
                name=actor_name, lifetime="detached", get_if_exists=True, num_cpus=0, max_concurrency=2).remote(run)

    def set(self, **values) -> None:
        if self.keeper is not None:
            self.keeper.set.remote(values)  # fire and forget: a gauge never holds a phase up

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close.remote(self.linger_s)
