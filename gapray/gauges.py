"""Run-level gauges for the Ray dashboard and Prometheus: `gapray_run_*`, tagged with the run's name.

Ray's metrics agent drops a gauge value not refreshed within two report intervals
(`ray._private.telemetry.open_telemetry_metric_recorder`: TTL 2 x metrics_report_interval_ms). On a `ray start
--head` cluster with a 1 s interval, values the driver set once per phase were seen for only ~1-2 s (the issue's
measurement), and a Prometheus scrape every 15 s (Ray's default setup) missed most of them; in an embedded
`ray.init` a set-once gauge of a live actor stayed visible (checked for 20 s), so the cluster path's exact cause
was not isolated. Holding the values and setting them again on a timer makes visibility not depend on it, and
a driver actor that ends with the job no longer takes the last values with it.

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

    def __init__(self, run: str, actor_name: str, linger_s: float = 60.0, namespace: str | None = None):
        self.keeper, self.linger_s = None, linger_s
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            self.keeper = ray.remote(GaugeKeeper).options(
                name=actor_name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
                max_concurrency=2).remote(run)

    def set(self, **values) -> None:
        if self.keeper is not None:
            self.keeper.set.remote(values)  # fire and forget: a gauge never holds a phase up

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close.remote(self.linger_s)
