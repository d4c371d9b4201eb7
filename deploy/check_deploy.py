#!/usr/bin/env python3
"""Static checks of deploy/ that need no cluster, no Docker and no Grafana; deploy/check.sh runs them.

  check_deploy.py manifests BUILT.yaml OVERLAY   rendered kustomize output of base|dev|prod
  check_deploy.py tenants FILE                   a tenants file in kvq-store's format
  check_deploy.py prom-static PROMETHEUS.yml OUT kubernetes_sd checked here, OUT = static twin for promtool
  check_deploy.py dashboard JSON OUT_RULES.yml   layout checks; OUT = every query as a recording rule
  check_deploy.py dockerfiles DIR                 the build/runtime stage contract of the Dockerfiles
  check_deploy.py metrics REPO                    kvq_* names used in deploy/ vs defined in kvstore/ worker/
  check_deploy.py flags REPO BUILT.yaml...        every --flag the manifests and Dockerfiles pass exists

Each prints its findings and exits 1 on any error, 0 otherwise (3: nothing to compare, skipped).
"""
import json
import pathlib
import re
import sys

import yaml

ERRORS = []


def err(msg):
    ERRORS.append(msg)
    print(f"  error: {msg}")


def done():
    return 1 if ERRORS else 0


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests (rendered by kustomize)

PORTS = {  # component -> {port name: number}
    "kvq-store": {"grpc": 50051, "metrics": 9400},
    "kvq-worker": {"grpc": 50052, "metrics": 9401},
}


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_container(kind, name, tpl, overlay):
    spec = tpl["spec"]
    cs = spec["containers"]
    if len(cs) != 1:
        err(f"{kind}/{name}: expected one container, got {len(cs)}")
    c = cs[0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports != PORTS[name]:
        err(f"{kind}/{name}: named ports {ports}, want {PORTS[name]}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = c.get(probe)
        if not p or "grpc" not in p:
            err(f"{kind}/{name}: {probe} must be a gRPC health probe")
        elif p["grpc"].get("port") != PORTS[name]["grpc"]:
            err(f"{kind}/{name}: {probe} probes port {p['grpc'].get('port')}, not the grpc port")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        if "memory" not in res.get(part, {}):
            err(f"{kind}/{name}: resources.{part}.memory missing")
    if "cpu" not in res.get("requests", {}):
        err(f"{kind}/{name}: resources.requests.cpu missing")
    gpu_req = res.get("requests", {}).get("nvidia.com/gpu")
    gpu_lim = res.get("limits", {}).get("nvidia.com/gpu")
    if gpu_req != gpu_lim:
        err(f"{kind}/{name}: nvidia.com/gpu request {gpu_req} != limit {gpu_lim}")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True:
        err(f"{kind}/{name}: container must not escalate privileges and must have a read-only root")
    if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
        err(f"{kind}/{name}: pod must run as non-root")
    # every volumeMount has a volume, every $(VAR) in args is a defined env var
    vols = {v["name"] for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in vols:
            err(f"{kind}/{name}: volumeMount {m['name']} has no volume")
    env = {e["name"]: e for e in c.get("env", [])}
    for a in c.get("args", []):
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            if var not in env:
                err(f"{kind}/{name}: arg {a!r} uses $({var}), which is not in env")
    return c, gpu_req, env


def check_manifests(path, overlay):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    # The name of a generated object carries a hash suffix: find by prefix.
    def find(kind, prefix):
        for n, d in by.get(kind, {}).items():
            if n == prefix or re.fullmatch(re.escape(prefix) + r"-[a-z0-9]{10}", n):
                return d
        return None

    sts = by.get("StatefulSet", {}).get("kvq-store")
    dep = by.get("Deployment", {}).get("kvq-worker")
    if not sts or not dep:
        err("StatefulSet/kvq-store or Deployment/kvq-worker missing")
        return
    configmaps = by.get("ConfigMap", {})
    workloads = [("StatefulSet", "kvq-store", sts), ("Deployment", "kvq-worker", dep)]
    env_of = {}
    for kind, name, w in workloads:
        tpl = w["spec"]["template"]
        if not labels_match(w["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"]):
            err(f"{kind}/{name}: selector does not match the pod template labels")
        if tpl["metadata"]["labels"].get("app.kubernetes.io/part-of") != "kvq":
            err(f"{kind}/{name}: pods lack app.kubernetes.io/part-of=kvq (Prometheus keeps on it)")
        c, gpu, env = check_container(kind, name, tpl, overlay)
        # configMapKeyRefs point at existing maps and keys
        resolved = {}
        for e in env.values():
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if not ref:
                continue
            cm = configmaps.get(ref["name"])
            if cm is None:
                err(f"{kind}/{name}: env {e['name']} refers to missing ConfigMap {ref['name']}")
            elif ref["key"] not in cm.get("data", {}):
                err(f"{kind}/{name}: ConfigMap {ref['name']} has no key {ref['key']}")
            else:
                resolved[e["name"]] = cm["data"][ref["key"]]
        env_of[name] = resolved
        backend = resolved.get("KVQ_BACKEND")
        if name == "kvq-store":
            if gpu not in (None, 1):
                err(f"store pods must ask for exactly one GPU (one store per GPU), got {gpu}")
            if overlay == "dev" and (gpu is not None or backend != "cpu"):
                err("dev: the store must run the CPU backend without a GPU request")
            if overlay in ("base", "prod") and (gpu != 1 or backend not in ("cuda", "auto")):
                err(f"{overlay}: the store must ask for one GPU and run the cuda/auto backend")
        if backend not in ("auto", "cpu", "cuda"):
            err(f"{kind}/{name}: backend {backend!r} is not auto|cpu|cuda")
        if backend == "cuda" and gpu != 1:
            err(f"{kind}/{name}: the cuda backend needs an nvidia.com/gpu request")
        # Secrets referenced by volumes exist (prod creates kvq-tenants out of band)
        for v in tpl["spec"].get("volumes", []):
            if "secret" in v:
                sname = v["secret"]["secretName"]
                if overlay == "dev" and sname not in by.get("Secret", {}):
                    err(f"{kind}/{name}: Secret {sname} is not generated in dev")
                if not sname.startswith("kvq-tenants"):
                    err(f"{kind}/{name}: unexpected Secret {sname}")

    # Secrets referenced by env: generated in dev (prod creates them out of band)
    for kind, name, w in workloads:
        for e in w["spec"]["template"]["spec"]["containers"][0].get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and overlay == "dev":
                sec = by.get("Secret", {}).get(ref["name"])
                if sec is None or ref["key"] not in sec.get("data", {}):
                    err(f"{kind}/{name}: env {e['name']} needs Secret {ref['name']} key {ref['key']}, not generated in dev")
    if overlay == "dev":
        import base64
        secrets = by.get("Secret", {})
        tenants = next((s for n, s in secrets.items() if n.startswith("kvq-tenants")), None)
        tok = next((s for n, s in secrets.items() if n.startswith("kvq-worker-store-token")), None)
        if tenants and tok:
            tenant_tokens = {ln.split("#", 1)[0].split()[0] for ln in
                             base64.b64decode(tenants["data"]["tenants.txt"]).decode().splitlines()
                             if ln.split("#", 1)[0].split()}
            if base64.b64decode(tok["data"]["token"]).decode() not in tenant_tokens:
                err("dev: the worker's store token is not a token of the tenants file")

    # headless Service governs the StatefulSet and routes by stable pod names
    svc = by.get("Service", {}).get(sts["spec"]["serviceName"])
    if svc is None:
        err(f"StatefulSet serviceName {sts['spec']['serviceName']} has no Service")
    else:
        if svc["spec"].get("clusterIP") != "None":
            err("the store Service must be headless (clusterIP: None)")
    for sname, comp in (("kvq-store", "kvq-store"), ("kvq-worker", "kvq-worker")):
        s = by.get("Service", {}).get(sname)
        if s is None:
            err(f"Service {sname} missing")
            continue
        tpl_labels = (sts if comp == "kvq-store" else dep)["spec"]["template"]["metadata"]["labels"]
        if not labels_match(s["spec"]["selector"], tpl_labels):
            err(f"Service {sname} does not select the {comp} pods")
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in s["spec"]["ports"]}
        want = {n: (num, n) for n, num in PORTS[comp].items()}
        if ports != want:
            err(f"Service {sname}: ports {ports}, want {want}")

    # the worker's store list names exactly the StatefulSet's pods through the headless Service
    replicas = sts["spec"].get("replicas", 1)
    store_list = env_of.get("kvq-worker", {}).get("KVQ_STORE", "")
    want = ",".join(f"kvq-store-{i}.{sts['spec']['serviceName']}:50051" for i in range(replicas))
    if store_list != want:
        err(f"worker store list {store_list!r} does not match {replicas} store replicas ({want!r})")

    for name, w in (("kvq-store", sts), ("kvq-worker", dep)):
        pdb = by.get("PodDisruptionBudget", {}).get(name)
        if pdb is None:
            err(f"PodDisruptionBudget {name} missing")
        elif not labels_match(pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]):
            err(f"PodDisruptionBudget {name} does not select its pods")
        np = by.get("NetworkPolicy", {}).get(name)
        if np is None:
            err(f"NetworkPolicy {name} missing")
        elif not labels_match(np["spec"]["podSelector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]):
            err(f"NetworkPolicy {name} does not select its pods")
        elif set(np["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
            err(f"NetworkPolicy {name} must restrict both ingress and egress")
    np = by.get("NetworkPolicy", {}).get("kvq-store")
    if np:
        grpc_rules = [r for r in np["spec"].get("ingress", []) if any(p.get("port") in ("grpc", 50051) for p in r.get("ports", []))]
        if not grpc_rules or any(not r.get("from") for r in grpc_rules):
            err("NetworkPolicy kvq-store must admit gRPC only from selected peers (the workers)")
    print(f"  {overlay}: {len(docs)} objects, {replicas} store(s), worker replicas {dep['spec'].get('replicas', 1)}")


# ---------------------------------------------------------------------------------------------
# tenants file (mirrors kvstore/tenants.h: `<token> <tenant> <max_sessions> <max_tokens> <max_bytes>`)

def check_tenants(path):
    tokens = set()
    quotas = {}
    n = 0
    for i, raw in enumerate(open(path).read().split("\n"), 1):
        line = raw.split("#", 1)[0]
        f = line.split()
        if not f:
            continue
        n += 1
        where = f"{path}:{i}"
        if len(f) != 5:
            err(f"{where}: want 5 fields `token tenant max_sessions max_tokens max_bytes`, got {len(f)}")
            continue
        tok, tenant, *q = f
        if not 8 <= len(tok) <= 512 or not all(33 <= ord(ch) <= 126 for ch in tok):
            err(f"{where}: token must be 8..512 printable characters without spaces")
        if tok in tokens:
            err(f"{where}: duplicate token")
        tokens.add(tok)
        if not all(x.isdigit() for x in q):
            err(f"{where}: quotas must be non-negative integers")
        elif quotas.setdefault(tenant, q) != q:
            err(f"{where}: tenant {tenant} listed with different quotas")
    if n == 0:
        err(f"{path}: no tenant")
    print(f"  {path}: {n} token(s), {len(quotas)} tenant(s)")


# ---------------------------------------------------------------------------------------------
# Prometheus config with kubernetes_sd (Debian's promtool is built without Kubernetes discovery)

def check_prom_static(path, out):
    cfg = yaml.safe_load(open(path))
    jobs = {j["job_name"]: j for j in cfg.get("scrape_configs", [])}
    for want in ("kvq-store", "kvq-worker"):
        if want not in jobs:
            err(f"{path}: no scrape job {want}")
    for name, j in jobs.items():
        sds = j.pop("kubernetes_sd_configs", None)
        if not sds:
            err(f"{path}: job {name} has no kubernetes_sd_configs")
            continue
        for sd in sds:
            unknown = set(sd) - {"role", "namespaces", "selectors", "api_server", "kubeconfig_file",
                                 "attach_metadata", "follow_redirects", "enable_http2", "tls_config",
                                 "authorization", "oauth2", "proxy_url", "basic_auth"}
            if unknown:
                err(f"{path}: job {name}: unknown kubernetes_sd_configs fields {sorted(unknown)}")
            if sd.get("role") != "pod":
                err(f"{path}: job {name}: role must be pod (one target per pod metrics port)")
            ns = sd.get("namespaces", {})
            if set(ns) - {"names", "own_namespace"} or not isinstance(ns.get("names", []), list):
                err(f"{path}: job {name}: bad namespaces block {ns}")
        rl = j.get("relabel_configs", [])
        keeps = [r for r in rl if r.get("action") == "keep"]
        if not any(r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"] and r.get("regex") == "metrics"
                   for r in keeps):
            err(f"{path}: job {name} does not keep only the port named metrics")
        if not any(name in str(r.get("regex", "")) for r in keeps):
            err(f"{path}: job {name} does not keep only its own component's pods")
        for lbl in ("namespace", "pod"):
            if not any(r.get("target_label") == lbl for r in rl):
                err(f"{path}: job {name} sets no {lbl} label (alerts and dashboard group by it)")
        j["static_configs"] = [{"targets": ["placeholder.invalid:1"]}]
    cfg["rule_files"] = [str((pathlib.Path(path).parent / f).resolve()) for f in cfg.get("rule_files", [])]
    pathlib.Path(out).write_text(yaml.safe_dump(cfg, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Grafana dashboard

def dashboard_exprs(d):
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def check_dashboard(path, out_rules):
    d = json.load(open(path))
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in d:
            err(f"{path}: no {key}")
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)):
        err(f"{path}: duplicate panel ids")
    cells = {}
    for p in d["panels"]:
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            err(f"{path}: panel {p['title']!r} is outside the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    err(f"{path}: panels {cells[(x, y)]!r} and {p['title']!r} overlap")
                cells[(x, y)] = p["title"]
        if p["type"] != "row" and not p.get("targets"):
            err(f"{path}: panel {p['title']!r} has no query")
    variables = {v["name"] for v in d["templating"]["list"]} | {"__rate_interval", "__interval", "__range"}
    rules = []
    for i, (title, e) in enumerate(dashboard_exprs(d)):
        for v in re.findall(r"\$\{?(\w+)", e):
            if v not in variables:
                err(f"{path}: panel {title!r} uses undefined variable ${v}")
        concrete = (e.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                    .replace("$__range", "1h"))
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        rules.append({"record": f"dashboard_query_{i}", "expr": concrete})
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
            if not m:
                err(f"{path}: variable {v['name']} query is not label_values(selector, label)")
            else:
                sel = re.sub(r"\$\{?\w+\}?", ".*", m.group(1))
                rules.append({"record": f"dashboard_variable_{v['name']}", "expr": f"count by ({m.group(2)}) ({sel})"})
    pathlib.Path(out_rules).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]},
                                                      sort_keys=False))
    print(f"  {path}: {len(d['panels'])} panels, {len(rules)} queries")


# ---------------------------------------------------------------------------------------------
# Dockerfiles

def check_dockerfiles(directory):
    root = pathlib.Path(directory)
    for name, target, port in (("Dockerfile.store", "kvq-store", "50051 9400"),
                               ("Dockerfile.worker", "kvq-worker", "50052 9401")):
        f = root / name
        if not f.exists():
            err(f"{f}: missing")
            continue
        text = f.read_text()
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
        stages = [s for _, s in froms]
        if stages[:1] != ["build"] or len(froms) < 2:
            err(f"{f}: want a multi-stage build whose first stage is `build`")
        if not re.search(r"^ARG DEBIAN_IMAGE=debian:12$", text, re.M) or froms[0][0] != "${DEBIAN_IMAGE}":
            err(f"{f}: the build stage must be Debian 12")
        if froms[-1][0] != "debian:12-slim":
            err(f"{f}: the runtime stage must be debian:12-slim (same libraries as the build)")
        if "scripts/install_deps.sh" not in text:
            err(f"{f}: the build stage must install the packages of scripts/install_deps.sh")
        if f"--target {target}" not in text:
            err(f"{f}: does not build the {target} target")
        if f"EXPOSE {port}" not in text:
            err(f"{f}: EXPOSE {port} missing")
        if not re.search(r"^USER 10001", text, re.M):
            err(f"{f}: runtime must run as uid 10001 (the manifests' runAsUser)")
        if not (root / f"{name}.dockerignore").exists():
            err(f"{f}: no {name}.dockerignore beside it")
        for src in re.findall(r"COPY --from=build (\S+)", text):
            if src.startswith("/out") is False:
                err(f"{f}: copies {src} from the build stage, expected /out/...")
    # kvq-worker opens BLAS and cuBLAS at run time (docs/worker.md): ldd does not list them, so the
    # worker image must package the build's list of them and check it in the runtime stage
    worker = root / "Dockerfile.worker"
    if worker.exists():
        text = worker.read_text()
        if not re.search(r"collect-runtime\.sh[^\n]*--dlopen\s+\S*kvq-worker\.dlopen", text):
            err(f"{worker}: collect-runtime.sh must get --dlopen with the build's kvq-worker.dlopen")
        if "/opt/kvq/kvq-worker.dlopen" not in text:
            err(f"{worker}: the runtime stage must check the libraries of kvq-worker.dlopen")


# ---------------------------------------------------------------------------------------------
# metric names: deploy/ vs the sources

def used_metrics(repo):
    names = set()
    for f in [repo / "deploy/prometheus/alerts.yml", repo / "deploy/grafana/kvq-dashboard.json"]:
        names |= set(re.findall(r"\bkvq_(?:store|worker)_[a-z0-9_]+", f.read_text()))
    base = set()
    for n in names:
        base.add(re.sub(r"_(bucket|sum|count)$", "", n))
    return base


def check_metrics(repo):
    repo = pathlib.Path(repo)
    defined = set()
    for folder in ("kvstore", "worker"):
        for f in (repo / folder).rglob("*"):
            if f.suffix in (".cc", ".h", ".cpp", ".hpp") and f.is_file():
                defined |= set(re.findall(r'"(kvq_(?:store|worker)_[a-z0-9_]+)"', f.read_text(errors="replace")))
    used = used_metrics(repo)
    if not defined:
        print("  no kvq_* metric names found in kvstore/ or worker/ sources yet: nothing to compare")
        return 3
    for comp in ("store", "worker"):
        d = {n for n in defined if n.startswith(f"kvq_{comp}_")}
        u = {n for n in used if n.startswith(f"kvq_{comp}_")}
        if not d:
            print(f"  kvq_{comp}_*: not defined in the sources yet, {len(u)} used by deploy/ (not compared)")
            continue
        for n in sorted(u - d):
            err(f"deploy/ uses {n}, which the sources do not define")
        for n in sorted(d - u):
            print(f"  note: {n} is exported but neither alerted on nor on the dashboard")
        print(f"  kvq_{comp}_*: {len(u & d)} of {len(u)} used names defined in the sources")
    return None


# ---------------------------------------------------------------------------------------------
# command-line flags: what deploy/ passes vs the ABSL_FLAGs of the binaries' main.cc

BINARIES = {"kvq-store": "kvstore/main.cc", "kvq-worker": "worker/main.cc"}


def defined_flags(repo, binary):
    f = pathlib.Path(repo) / BINARIES[binary]
    if not f.exists():
        return None
    return set(re.findall(r"ABSL_FLAG\(\s*[\w:<>]+\s*,\s*(\w+)\s*,", f.read_text()))


def check_flags(repo, built):
    uses = []  # (where, binary, flag)
    for path in built:
        for d in yaml.safe_load_all(open(path)):
            if not d or d["kind"] not in ("StatefulSet", "Deployment"):
                continue
            binary = d["metadata"]["name"]
            for c in d["spec"]["template"]["spec"]["containers"]:
                for a in c.get("args", []):
                    m = re.match(r"--([A-Za-z0-9_]+)", a)
                    if m:
                        uses.append((f"{path}: {d['kind']}/{binary}", binary, m.group(1)))
    for name, binary in (("Dockerfile.store", "kvq-store"), ("Dockerfile.worker", "kvq-worker")):
        text = (pathlib.Path(repo) / "deploy/docker" / name).read_text()
        m = re.search(r"^CMD (\[.*\])", text, re.M)
        for a in json.loads(m.group(1)) if m else []:
            fm = re.match(r"--([A-Za-z0-9_]+)", a)
            if fm:
                uses.append((f"deploy/docker/{name} CMD", binary, fm.group(1)))
    compared = 0
    for where, binary, flag in uses:
        have = defined_flags(repo, binary)
        if have is None:
            print(f"  {BINARIES[binary]} not there yet: {binary} flags not compared")
            continue
        compared += 1
        if flag not in have:
            err(f"{where} passes --{flag}, which {binary} ({BINARIES[binary]}) does not define")
    print(f"  {compared} flag uses compared with the binaries' ABSL_FLAGs")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "manifests":
        check_manifests(args[0], args[1])
    elif cmd == "tenants":
        for a in args:
            check_tenants(a)
    elif cmd == "prom-static":
        check_prom_static(args[0], args[1])
    elif cmd == "dashboard":
        check_dashboard(args[0], args[1])
    elif cmd == "dockerfiles":
        check_dockerfiles(args[0])
    elif cmd == "flags":
        check_flags(args[0], args[1:])
    elif cmd == "metrics":
        rc = check_metrics(args[0])
        if rc == 3 and not ERRORS:
            return 3
    else:
        print(__doc__)
        return 2
    return done()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
