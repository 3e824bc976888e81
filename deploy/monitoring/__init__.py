"""Monitoring as code: the Prometheus alert rules (alerts.py) and the Grafana dashboard
(dashboard.py) on the metrics of api/metrics.py and tasks/metrics.py; build.py writes the files
that are deployed (docs/operations.md, "Alerts")."""
