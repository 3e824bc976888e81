"""What the code exports and what a PromQL expression names, for the checks of the alert rules and
the dashboard: a query naming a metric that nothing exports is a silent, always-empty panel or an
alert that never fires."""

from __future__ import annotations

import re

#: Series Prometheus itself adds to every target's scrape.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


class _Backlog:
    """A job service whose job store answers the outbox query (api.metrics.OutboxCollector)."""

    def outbox(self):
        return {"pending": 0, "overdue_seconds": 0.0}


def _sample_names(families) -> set[str]:
    names = set()
    for family in families:
        # A labelled metric no one has used yet has no sample: its names follow from its type.
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def exported_names(monkeypatch=None) -> frozenset[str]:
    """Every sample name the gateway's /metrics and a worker's metrics port can serve, read from
    the code's collectors: the default registry (prometheus_client's process and platform
    metrics, api.metrics, tasks.metrics), the gateway's scrape-time outbox collector, and the CUDA
    memory collector of a CUDA worker (torch.cuda's counters stubbed with ``monkeypatch``)."""
    import api.metrics
    import tasks.metrics  # noqa: F401 (registers the workers' metrics)
    import tasks.worker  # noqa: F401 (a worker process imports it)

    names = _sample_names(api.metrics.scrape_registry(_Backlog()).collect())
    if monkeypatch is not None:
        import torch

        for read in ("memory_allocated", "memory_reserved", "max_memory_allocated"):
            monkeypatch.setattr(torch.cuda, read, lambda device=None: 0)
        names |= _sample_names(tasks.metrics.CudaMemoryCollector("cuda:0").collect())
    return frozenset(names)


#: Labels Prometheus puts on every scraped series (the scrape jobs' target labels,
#: docs/operations.md#scraping).
TARGET_LABELS = frozenset({"job", "instance", "role"})


def exported_labels(monkeypatch=None) -> dict[str, frozenset[str]]:
    """The label names of each exported sample name (as exported_names), from the metric objects'
    declared labels (a histogram's buckets add ``le``) or, for scrape-time collectors, their samples."""
    import api.metrics
    import tasks.metrics
    from prometheus_client.metrics import MetricWrapperBase

    labels: dict[str, set[str]] = {}
    for module in (api.metrics, tasks.metrics):
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            for suffix in _SUFFIXES[metric._type]:
                extra = {"le"} if suffix == "_bucket" else set()
                labels.setdefault(metric._name + suffix, set()).update(set(metric._labelnames) | extra)
    families = list(api.metrics.OutboxCollector(_Backlog()).collect())
    if monkeypatch is not None:
        exported_names(monkeypatch)  # stubs torch.cuda's counters
        families += list(tasks.metrics.CudaMemoryCollector("cuda:0").collect())
    for family in families:
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}


_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """The label names each ``metric{...}`` selector of an expression matches on."""
    found: dict[str, set[str]] = {}
    for name, body in _SELECTOR.findall(_STRINGS.sub('""', _VARIABLES.sub(" ", expr))):
        found.setdefault(name, set()).update(_MATCHER.findall(body))
    return found


_KEYWORDS = frozenset({"and", "or", "unless", "bool", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "offset", "inf", "nan", "atan2"})
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.+-]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed): what is left
    once strings, label matchers, ranges, grouping clauses, functions and keywords are taken out."""
    text = _VARIABLES.sub(" ", expr)
    text = _STRINGS.sub('""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = _NUMBER.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}
