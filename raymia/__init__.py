"""raymia: distributed evaluation of privacy attacks on ML models and the defenses against them.

From Python, the same audits and sweeps as the `raymia` command, with their result objects:

    import raymia

    result = raymia.run_audit({"plan": {"num_models": 8, "population": 400}, "bank": {"engine": "local"}},
                              ["train.epochs=30", "tracking.enabled=false"])
    result.attacks["lira_online"]["auc"]                     # the mean over the targets
    signals = raymia.read_signals(result)                    # the bank's stored outputs; trains nothing
    scores = raymia.run_attack("loss", None, signals, 0)     # any registered attack, on target 0
    raymia.attack_metrics(scores, signals.keep[0])           # AUC, TPR at each FPR level
    result.table()                                           # pandas: a row per attack, every metric, std, CI

`result` itself prints as its headline metrics, and a notebook shows report.html's tables and figure.

A spec is a spec object (`raymia.AuditSpec`, `raymia.SweepSpec`), a dict with the YAML's structure or a
YAML file's path; overrides are the CLI's `dotted.key=value` strings; a bad field is one
`raymia.SpecError` naming it. `raymia.spec_schema()` is the specs' JSON Schema (`raymia schema`).
"""

__version__ = "0.1.0"

# the Python API: imported on first use, so `import raymia` stays light (every Ray worker imports it)
_API = {
    "run_audit": "raymia.audit", "read_signals": "raymia.audit", "AuditResult": "raymia.audit",
    "run_sweep": "raymia.sweep", "SweepResult": "raymia.sweep",
    "as_spec": "raymia.resolve", "AuditSpec": "raymia.spec", "SweepSpec": "raymia.spec",
    "spec_schema": "raymia.spec", "run_attack": "raymia.attacks", "attack_metrics": "raymia.metrics",
    "full_metrics": "raymia.metrics", "Signals": "raymia.signals", "RaymiaError": "raymia.errors",
    "SpecError": "raymia.errors", "shadow_curve": "raymia.shadows", "ShadowCurve": "raymia.shadows",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'raymia' has no attribute {name!r}")
