#!/usr/bin/env bash
# Checks the alerting rules and the Grafana dashboard that ship in deploy/:
#   * promtool check rules / promtool test rules (promtool is installed from
#     Debian's `prometheus` package when missing; no Prometheus server is
#     left running, and none is started by the install);
#   * the dashboard is valid JSON with the expected shape;
#   * every snapshotd_* metric named in the rules, their tests' alerts and
#     the dashboard is one src/stats.rs registers (or snapshotd_build_info),
#     and every recorded name (level:metric:op) used is recorded in the rules.
# Run from anywhere; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

rules=deploy/prometheus/snapshotd.rules.yml
tests=deploy/prometheus/snapshotd.rules.test.yml
dashboard=deploy/grafana/snapshotd.json

# --- promtool
if ! command -v promtool >/dev/null; then
  log "installing promtool (Debian package prometheus)"
  # Keep the package's maintainer scripts from starting the server: a
  # policy-rc.d that refuses every start (only when none is there already).
  created_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  install_rc=0
  {
    as_root apt-get update -q &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
  } || install_rc=$?
  if [ -n "$created_policy" ]; then
    as_root rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  # Whatever started anyway (systemd ignores policy-rc.d when it starts a
  # unit by itself): stop it and keep it from starting at boot.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  [ "$install_rc" = 0 ] || { echo "installing prometheus failed (exit $install_rc)" >&2; exit "$install_rc"; }
fi
promtool --version 2>&1 | sed -n 1p

# --- rules and their unit tests
log "promtool check rules $rules"
promtool check rules "$rules"
log "promtool test rules $tests"
promtool test rules "$tests"

# --- dashboard JSON and metric names
log "validating $dashboard and the metric names"
python3 -m json.tool "$dashboard" >/dev/null
python3 - "$rules" "$tests" "$dashboard" src/stats.rs <<'PY'
import json, re, sys

rules_path, tests_path, dash_path, stats_path = sys.argv[1:]
problems = []

# What src/stats.rs registers: (NAME, "help", &stats.field) tuples and
# r.register(NAME, "help", stats.field.clone()) calls, NAME being a constant
# of `mod names`; the field's type in `struct Stats` says counter, gauge or
# histogram.
src = open(stats_path, encoding="utf-8").read()
consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([^"]+)";', src))
prefix = consts.pop("PREFIX", None)
if prefix != "snapshotd":
    sys.exit(f"{stats_path}: no `pub const PREFIX: &str = \"snapshotd\"` found; update deploy/check.sh")
struct = re.search(r"pub struct Stats \{(.*?)\n\}", src, re.S)
if not struct:
    sys.exit(f"{stats_path}: `pub struct Stats` not found; update deploy/check.sh")
fields = dict(re.findall(r"^\s*pub (\w+): (.+),\s*$", struct.group(1), re.M))
help_str = r'"(?:[^"\\]|\\.)*"'
registered = re.findall(r"\(\s*([A-Z_]+),\s*" + help_str + r",\s*&stats\.(\w+),?\s*\)", src)
registered += re.findall(r"register\(\s*([A-Z_]+),\s*" + help_str + r",\s*stats\.(\w+)\.clone\(\),?\s*\)", src)
known = {"snapshotd_build_info"}  # a gauge of value 1, labels version and commit
families = set()  # histogram names without a suffix: fine in prose, not in a query
for const, field in registered:
    if const not in consts or field not in fields:
        problems.append(f"{stats_path}: cannot resolve registration ({const}, stats.{field})")
        continue
    name, kind = f"{prefix}_{consts[const]}", fields[field]
    if "Histogram" in kind:
        known |= {name + "_bucket", name + "_sum", name + "_count"}
        families.add(name)
    elif "Counter" in kind:
        known.add(name + "_total")
    elif "Gauge" in kind:
        known.add(name)
    else:
        problems.append(f"{stats_path}: stats.{field} has a type this check does not know: {kind}")
if len(known) < 20:
    sys.exit(f"{stats_path}: found only {len(known)} metrics ({sorted(known)}); update deploy/check.sh")

metric = re.compile(r"(?<![\w:])snapshotd_\w+(?![\w:])")
recorded_use = re.compile(r"(?<![\w:])[a-zA-Z_]\w*:[a-zA-Z_][\w]*:\w+(?![\w:])")

def without_comments(text):
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))

rules_text = without_comments(open(rules_path, encoding="utf-8").read())
recorded = set(re.findall(r"^\s*-?\s*record:\s*['\"]?([\w:]+)", rules_text, re.M))
texts = {
    rules_path: rules_text,
    tests_path: without_comments(open(tests_path, encoding="utf-8").read()),
}
dashboard = json.load(open(dash_path, encoding="utf-8"))

def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node

# The dashboard's queries (targets, template variables) must name series
# that exist; its prose may also name a histogram family.
queries = []
def collect(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                queries.append(value)
            else:
                collect(value)
    elif isinstance(node, list):
        for value in node:
            collect(value)
collect(dashboard)
bad_in_queries = set(metric.findall("\n".join(queries))) - known
for name in sorted(bad_in_queries):
    problems.append(f"{dash_path}: unknown metric {name} in a query (not a series {stats_path} exposes)")
texts[dash_path] = "\n".join(strings(dashboard))
# YAML is read as text: rule expressions, test series and annotations alike.
for path, text in texts.items():
    reported = bad_in_queries if path == dash_path else set()
    for name in sorted(set(metric.findall(text)) - known - families - reported):
        problems.append(f"{path}: unknown metric {name} (not registered in {stats_path})")
    if path != dash_path:
        for name in sorted(set(recorded_use.findall(text)) - recorded):
            problems.append(f"{path}: recorded series {name} is used but no rule records it")

# The dashboard's shape: what an import or provisioning needs.
if not isinstance(dashboard.get("panels"), list) or not dashboard["panels"]:
    problems.append(f"{dash_path}: no panels")
if not isinstance(dashboard.get("schemaVersion"), int):
    problems.append(f"{dash_path}: no schemaVersion")
variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
for needed in ("DS_PROMETHEUS", "instance"):
    if needed not in variables:
        problems.append(f"{dash_path}: template variable {needed} missing")
ids = [p.get("id") for p in dashboard.get("panels", [])]
if len(ids) != len(set(ids)):
    problems.append(f"{dash_path}: duplicate panel ids")
for panel in dashboard.get("panels", []):
    if panel.get("type") == "row":
        continue
    targets = panel.get("targets") or []
    if not targets or not all(t.get("expr") for t in targets):
        problems.append(f"{dash_path}: panel {panel.get('title')!r} has a target without expr")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"ok: {len(known)} metric names from {stats_path}; {len(recorded)} recorded series; "
      f"{len(dashboard['panels'])} dashboard panels")
PY
log "deploy checks passed"
