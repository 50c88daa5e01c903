//! The deployment examples in `deploy/`: every YAML file parses; the Kubernetes objects have what
//! kubectl requires and fit together (selectors and labels, ports, probes, volumes, the fleet's
//! headless Service); the compose file's services, volumes and files exist; and every regproxy
//! invocation in them (flags, `REGPROXY_*` variables, the commands of the set-up script) is one
//! this binary accepts, down to `regproxy config check` for each node's settings.
//!
//! No Kubernetes cluster or Docker engine is needed: `regproxy --help` is the reference, so a
//! renamed flag fails here. The compose example's set-up script runs against a real Garage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::{Mapping, Value};

mod support;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `deploy/` whose names end in one of `exts`, sorted.
fn deploy_files(exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, exts, out);
            } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("deploy"), exts, &mut out);
    out.sort();
    out
}

/// The YAML documents of a file, with `<<` merge keys applied (compose uses them).
fn documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            merge_keys(&mut v);
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Applies `<<: *anchor` merges, nested ones included (an anchor that merges another).
fn merge_keys(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            while let Some(base) = m.remove("<<") {
                let Value::Mapping(base) = base else {
                    panic!("a << merge of something other than a mapping")
                };
                for (k, val) in base {
                    m.entry(k).or_insert(val);
                }
            }
            m.values_mut().for_each(merge_keys);
        }
        Value::Sequence(s) => s.iter_mut().for_each(merge_keys),
        _ => {}
    }
}

/// The value at a dotted path of mapping keys.
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {path} in {v:?}"))
}

fn list<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn strings(m: Option<&Value>) -> BTreeMap<String, String> {
    let m = m.and_then(Value::as_mapping).cloned().unwrap_or_default();
    let scalar = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
    };
    m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect()
}

// ---------------------------------------------------------------------------------------------
// What the binary accepts

/// What `regproxy WORDS… --help` lists: flags (and whether each takes a value), subcommands,
/// whether it takes arguments, and the `REGPROXY_*` variables.
#[derive(Debug)]
struct Help {
    flags: BTreeMap<String, bool>,
    commands: BTreeSet<String>,
    arguments: bool,
    vars: BTreeSet<String>,
}

fn help(words: &[String]) -> Help {
    let out = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(words)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "regproxy {words:?} --help: {text}");
    let mut h = Help {
        flags: BTreeMap::new(),
        commands: BTreeSet::new(),
        arguments: false,
        vars: BTreeSet::new(),
    };
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            h.arguments |= section == "Arguments";
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match (section, words.first()) {
            ("Commands", Some(cmd)) => drop(h.commands.insert(cmd.to_string())),
            ("Options", Some(first)) if first.starts_with('-') => {
                let takes = words.get(1..).unwrap_or(&[]);
                for w in words.iter().filter_map(|w| w.strip_prefix("--")) {
                    let value = takes.iter().any(|t| t.starts_with('<'));
                    h.flags.insert(w.trim_end_matches(',').to_owned(), value);
                }
            }
            _ => {}
        }
        for var in line.split("[env: ").skip(1) {
            h.vars.insert(var.split('=').next().unwrap().to_owned());
        }
    }
    h
}

/// Checks `argv` (what follows `regproxy`) against the help of each subcommand it names; the
/// subcommand words. `whence` names the file and place for a failure.
fn check_argv(argv: &[String], whence: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut h = help(&words);
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if let Some(flag) = arg.strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            let Some(&takes) = h.flags.get(name) else {
                panic!(
                    "{whence}: `regproxy {}` has no flag --{name}",
                    words.join(" ")
                )
            };
            assert!(
                takes || inline.is_none(),
                "{whence}: --{name} takes no value"
            );
            if takes && inline.is_none() {
                assert!(args.next().is_some(), "{whence}: --{name} needs a value");
            }
        } else if h.commands.contains(arg) {
            words.push(arg.clone());
            h = help(&words);
        } else {
            assert!(
                h.arguments && !arg.starts_with('-'),
                "{whence}: `regproxy {}` takes no argument {arg:?}",
                words.join(" ")
            );
        }
    }
    words
}

/// The `REGPROXY_*` variables the image sets (the Dockerfile's `ENV`): every container's start.
fn image_env() -> BTreeMap<String, String> {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let env: BTreeMap<String, String> = joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| k.starts_with("REGPROXY_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(env.contains_key("REGPROXY_LISTEN"), "{env:?}");
    env
}

/// One start of regproxy in an example: its arguments and environment, as the container sees
/// them, and the directories mounted into it (mount point → the files a Secret puts there, if
/// it names them).
struct Invocation {
    whence: String,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    mounts: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Invocation {
    /// A setting's value, from the flags, else the example's environment, else the image's.
    fn setting(&self, flag: &str) -> Option<String> {
        let inline = format!("--{flag}=");
        let mut args = self.argv.iter();
        while let Some(a) = args.next() {
            if let Some(v) = a.strip_prefix(&inline) {
                return Some(v.to_owned());
            }
            if *a == format!("--{flag}") {
                return args.next().cloned();
            }
        }
        let var = format!("REGPROXY_{}", flag.to_uppercase().replace('-', "_"));
        self.env.get(&var).or(image_env().get(&var)).cloned()
    }

    /// Checks flags and variables; the subcommand words.
    fn check_names(&self) -> Vec<String> {
        let known = help(&[]).vars;
        for var in self.env.keys().filter(|k| k.starts_with("REGPROXY_")) {
            assert!(
                known.contains(var),
                "{}: regproxy knows no {var}",
                self.whence
            );
        }
        check_argv(&self.argv, &self.whence)
    }

    /// Every file or directory setting with an absolute path lies in a mounted volume (in the
    /// Secret's file list when the volume names its files).
    fn check_mounted(&self) {
        for flag in [
            "ca-dir",
            "cache-dir",
            "secret-access-key-file",
            "peer-secret-file",
        ] {
            let Some(path) = self.setting(flag).filter(|p| p.starts_with('/')) else {
                continue;
            };
            let mount = self
                .mounts
                .iter()
                .filter(|(m, _)| Path::new(&path).starts_with(m))
                .max_by_key(|(m, _)| m.len());
            let Some((point, files)) = mount else {
                panic!("{}: --{flag} {path} is in no mounted volume", self.whence)
            };
            if let Some(files) = files {
                let rel = path[point.len()..].trim_start_matches('/');
                assert!(
                    files.contains(rel),
                    "{}: --{flag} {path}: the volume at {point} holds only {files:?}",
                    self.whence
                );
            }
        }
    }

    /// `regproxy config check` with these settings, files and directories mapped into a
    /// temporary directory (secret files made up): what `run` would refuse, it refuses.
    fn config_check(&self) {
        let tmp = tempfile::tempdir().unwrap();
        let place = |key: &str, value: &str| -> String {
            let Some(rel) = value.strip_prefix('/') else {
                return value.to_owned();
            };
            let path = tmp.path().join(rel);
            let key = key.to_lowercase().replace('_', "-");
            if key.ends_with("-file") && !path.exists() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, "made-up-secret-0123456789abcdef\n").unwrap();
            }
            path.to_string_lossy().into_owned()
        };
        let mut argv: Vec<String> = Vec::new();
        let mut args = self.argv.iter().filter(|a| *a != "run");
        while let Some(a) = args.next() {
            match a.split_once('=') {
                Some((flag, v)) if flag.starts_with("--") => {
                    argv.push(format!("{flag}={}", place(flag, v)))
                }
                _ if a.starts_with("--") && help(&[]).flags.get(&a[2..]) == Some(&true) => {
                    let v = args.next().unwrap();
                    argv.extend([a.clone(), place(a, v)]);
                }
                _ => argv.push(a.clone()),
            }
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regproxy"));
        cmd.args(&argv).args(["config", "check"]).env_clear();
        for (k, v) in image_env().iter().chain(&self.env) {
            if k.starts_with("REGPROXY_") {
                cmd.env(k, place(k, v));
            }
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: regproxy refuses these settings: {}\n$ regproxy {argv:?} config check",
            self.whence,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

const WORKLOADS: &[&str] = &["Deployment", "DaemonSet", "StatefulSet"];

fn kubernetes_objects() -> Vec<(String, Value)> {
    let files = deploy_files(&[".yaml", ".yml"]);
    let k8s = files
        .iter()
        .filter(|f| f.starts_with(root().join("deploy/kubernetes")));
    let objects: Vec<(String, Value)> = k8s
        .flat_map(|f| {
            let name = f.strip_prefix(root()).unwrap().display().to_string();
            documents(f).into_iter().map(move |d| (name.clone(), d))
        })
        .collect();
    assert!(
        objects.len() >= 4,
        "too few Kubernetes objects: {}",
        objects.len()
    );
    objects
}

fn name_of(obj: &Value) -> &str {
    text(obj, "metadata.name")
}

fn namespace_of(obj: &Value) -> &str {
    at(obj, "metadata.namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Whether every label a selector names is on the pod template with the same value.
fn selects(selector: &BTreeMap<String, String>, workload: &Value) -> bool {
    let labels = strings(at(workload, "spec.template.metadata.labels"));
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Kubernetes size (`20Gi`, `512Mi`) or a regproxy one (`16GiB`, `50GB`) in bytes.
fn bytes(size: &str) -> u64 {
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (n, unit) = size.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("size {size:?}"));
    let unit = match unit.strip_suffix("iB") {
        Some(prefix) => format!("{prefix}i"),
        None => unit.trim_end_matches('B').to_owned(),
    };
    let (base, exp): (u64, u32) = match unit.as_str() {
        "" => (1, 0),
        "Ki" => (1024, 1),
        "Mi" => (1024, 2),
        "Gi" => (1024, 3),
        "Ti" => (1024, 4),
        "k" | "K" => (1000, 1),
        "M" => (1000, 2),
        "G" => (1000, 3),
        "T" => (1000, 4),
        _ => panic!("unknown unit in {size:?}"),
    };
    n * base.pow(exp)
}

#[test]
fn sizes_read_both_notations() {
    assert_eq!(bytes("20Gi"), 20 << 30);
    assert_eq!(bytes("16GiB"), 16 << 30);
    assert_eq!(bytes("50GB"), 50_000_000_000);
    assert_eq!(bytes("1Mi"), 1 << 20);
}

/// The number of one of a container's declared ports, named or given by number.
fn port(container: &Value, port: &Value) -> Option<u64> {
    let declared = list(container, "ports").iter();
    let found = declared.clone().find(|p| match port {
        Value::Number(_) => at(p, "containerPort") == Some(port),
        _ => at(p, "name") == Some(port),
    });
    found
        .and_then(|p| at(p, "containerPort"))
        .and_then(Value::as_u64)
}

/// Values of `$(NAME)` resolved as the kubelet would: downward API addresses, made-up Secret
/// values; a reference to a variable the container does not define is an error.
fn expand(s: &str, env: &BTreeMap<String, String>, whence: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("$(") {
        let end = rest[start..].find(')').map(|e| start + e).unwrap();
        let name = &rest[start + 2..end];
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("{whence}: $({name}) is not defined in the container"));
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out + rest
}

/// The container's environment: plain values, downward API fields and Secret keys made up.
fn container_env(container: &Value, whence: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in list(container, "env") {
        let name = text(var, "name").to_owned();
        let value = if let Some(v) = at(var, "value").and_then(Value::as_str) {
            expand(v, &env, whence)
        } else if let Some(field) = at(var, "valueFrom.fieldRef.fieldPath") {
            match field.as_str() {
                Some("status.podIP" | "status.hostIP") => "10.1.2.3".to_owned(),
                other => panic!("{whence}: {name} from an unexpected field {other:?}"),
            }
        } else if at(var, "valueFrom.secretKeyRef.key").is_some() {
            "GKmadeupaccesskey01".to_owned()
        } else {
            panic!("{whence}: {name} has neither value nor valueFrom")
        };
        env.insert(name, value);
    }
    env
}

/// The volumes of a pod template: name → (the volume, the files it holds if a Secret lists them).
fn volumes(spec: &Value) -> BTreeMap<String, (Value, Option<BTreeSet<String>>)> {
    let mut out = BTreeMap::new();
    for v in list(spec, "volumes") {
        let items = at(v, "secret.items").and_then(Value::as_sequence);
        let files = items.map(|items| items.iter().map(|i| text(i, "path").to_owned()).collect());
        let fresh = out.insert(text(v, "name").to_owned(), (v.clone(), files));
        assert!(fresh.is_none(), "volume {} twice", text(v, "name"));
    }
    out
}

/// A regproxy container's start: `command` + `args` when the command is regproxy's (the image's
/// entrypoint when there is none); `None` for another program.
fn k8s_invocation(container: &Value, spec: &Value, whence: &str) -> Option<Invocation> {
    let words = |key| -> Vec<String> {
        let items = list(container, key).iter();
        items.map(|w| w.as_str().unwrap().to_owned()).collect()
    };
    let command = words("command");
    if !(command.is_empty() || command == ["regproxy"]) {
        return None;
    }
    let env = container_env(container, whence);
    let argv = words("args")
        .iter()
        .map(|a| expand(a, &env, whence))
        .collect();
    let vols = volumes(spec);
    let mounts = list(container, "volumeMounts").iter().map(|m| {
        let (_, files) = &vols[text(m, "name")];
        (text(m, "mountPath").to_owned(), files.clone())
    });
    Some(Invocation {
        whence: whence.to_owned(),
        argv,
        env,
        mounts: mounts.collect(),
    })
}

#[test]
fn kubernetes_objects_have_what_kubectl_requires() {
    let objects = kubernetes_objects();
    let namespaces: BTreeSet<&str> = objects
        .iter()
        .filter(|(_, o)| text(o, "kind") == "Namespace")
        .map(|(_, o)| name_of(o))
        .collect();
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let mut seen = BTreeSet::new();
    for (file, o) in &objects {
        let (kind, name) = (text(o, "kind"), name_of(o));
        assert!(!text(o, "apiVersion").is_empty(), "{file}: {kind} {name}");
        assert!(dns_label(name), "{file}: {kind} name {name:?}");
        if kind != "Namespace" {
            assert!(
                namespaces.contains(namespace_of(o)),
                "{file}: {kind} {name} is in namespace {:?}, which deploy/ does not create",
                namespace_of(o)
            );
        }
        let key = (kind, namespace_of(o), name);
        assert!(seen.insert(key), "{file}: {kind} {name} defined twice");
        if WORKLOADS.contains(&kind) {
            check_workload(file, o);
        }
    }
    for (file, o) in objects
        .iter()
        .filter(|(_, o)| WORKLOADS.contains(&text(o, "kind")))
    {
        let spec = at(o, "spec.template.spec").unwrap();
        let containers = list(spec, "initContainers")
            .iter()
            .chain(list(spec, "containers"));
        for c in containers {
            let whence = format!("{file}: {} container {}", name_of(o), text(c, "name"));
            if let Some(inv) = k8s_invocation(c, spec, &whence) {
                inv.check_names();
            }
        }
    }
}

/// Labels and selectors, unique container and volume names, mounts of volumes that exist.
fn check_workload(file: &str, w: &Value) {
    let name = name_of(w);
    let selector = strings(at(w, "spec.selector.matchLabels"));
    assert!(
        selects(&selector, w),
        "{file}: {name}'s selector misses its pod labels"
    );
    let spec = at(w, "spec.template.spec").unwrap();
    let vols = volumes(spec);
    let all: Vec<&Value> = list(spec, "initContainers")
        .iter()
        .chain(list(spec, "containers"))
        .collect();
    assert!(
        !list(spec, "containers").is_empty(),
        "{file}: {name} has no containers"
    );
    let mut names = BTreeSet::new();
    for c in all {
        let cname = text(c, "name");
        assert!(
            names.insert(cname),
            "{file}: {name}: container {cname} twice"
        );
        assert!(!text(c, "image").is_empty());
        for m in list(c, "volumeMounts") {
            let v = text(m, "name");
            assert!(
                vols.contains_key(v),
                "{file}: {name}/{cname} mounts unknown volume {v}"
            );
        }
        for p in list(c, "ports") {
            let pname = at(p, "name").and_then(Value::as_str).unwrap_or("");
            assert!(pname.len() <= 15, "{file}: port name {pname:?} is too long");
        }
    }
}

#[test]
fn kubernetes_services_and_budgets_select_one_workload_and_its_ports() {
    let objects = kubernetes_objects();
    let workloads: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| WORKLOADS.contains(&text(o, "kind")))
        .collect();
    let selected = |o: &Value, selector: &BTreeMap<String, String>| -> Vec<&Value> {
        let same_ns = workloads
            .iter()
            .filter(|w| namespace_of(w) == namespace_of(o));
        same_ns.filter(|w| selects(selector, w)).copied().collect()
    };
    for (file, o) in &objects {
        let (kind, name) = (text(o, "kind"), name_of(o));
        let selector = match kind {
            "Service" => strings(at(o, "spec.selector")),
            "PodDisruptionBudget" => strings(at(o, "spec.selector.matchLabels")),
            _ => continue,
        };
        let matched = selected(o, &selector);
        assert_eq!(
            matched.len(),
            1,
            "{file}: {kind} {name} selects {} workloads",
            matched.len()
        );
        let containers = list(at(matched[0], "spec.template.spec").unwrap(), "containers");
        for p in list(o, "spec.ports") {
            let target = at(p, "targetPort").or(at(p, "port")).unwrap();
            let found = containers.iter().any(|c| port(c, target).is_some());
            assert!(
                found,
                "{file}: {kind} {name}: targetPort {target:?} is no container port"
            );
        }
    }
}

/// Each regproxy that runs: readiness on /readyz and liveness on /healthz at its admin port, a
/// cache on an emptyDir whose sizeLimit holds --max-cache-size, not root, its files in its
/// volumes, a fleet whose --peers-dns names a headless Service selecting it, and settings that
/// `config check` accepts.
#[test]
fn kubernetes_regproxy_nodes_are_probed_bounded_and_start() {
    let objects = kubernetes_objects();
    let mut nodes = 0;
    for (file, o) in objects
        .iter()
        .filter(|(_, o)| WORKLOADS.contains(&text(o, "kind")))
    {
        let spec = at(o, "spec.template.spec").unwrap();
        for c in list(spec, "containers") {
            let whence = format!("{file}: {} container {}", name_of(o), text(c, "name"));
            let Some(inv) = k8s_invocation(c, spec, &whence) else {
                continue;
            };
            if inv.check_names() != ["run"] {
                continue;
            }
            nodes += 1;
            check_probes(c, &inv);
            check_cache_volume(spec, &inv);
            check_not_root(o, c, &whence);
            check_peers_dns(&objects, o, c, &inv);
            inv.check_mounted();
            inv.config_check();
        }
    }
    assert!(
        nodes >= 2,
        "expected the shared Deployment and the per-node DaemonSet"
    );
}

fn check_probes(c: &Value, inv: &Invocation) {
    let admin = inv.setting("admin-listen").unwrap();
    let admin_port: u64 = admin.rsplit(':').next().unwrap().parse().unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = at(c, &format!("{probe}.httpGet"))
            .unwrap_or_else(|| panic!("{}: no {probe} httpGet", inv.whence));
        assert_eq!(text(get, "path"), path, "{}: {probe}", inv.whence);
        let p = port(c, at(get, "port").unwrap());
        assert_eq!(
            p,
            Some(admin_port),
            "{}: {probe} is not on the admin port",
            inv.whence
        );
    }
}

fn check_cache_volume(spec: &Value, inv: &Invocation) {
    let dir = inv.setting("cache-dir").unwrap();
    let c_mounts = inv.mounts.keys();
    assert!(
        c_mounts.clone().any(|m| *m == dir),
        "{}: the cache is not a volume",
        inv.whence
    );
    let vols = volumes(spec);
    let containers = list(spec, "containers").iter();
    let mount = containers
        .flat_map(|c| list(c, "volumeMounts"))
        .find(|m| text(m, "mountPath") == dir)
        .unwrap();
    let (volume, _) = &vols[text(mount, "name")];
    let limit = at(volume, "emptyDir.sizeLimit").and_then(Value::as_str);
    let limit = limit
        .unwrap_or_else(|| panic!("{}: the cache is no emptyDir with a sizeLimit", inv.whence));
    let max = inv
        .setting("max-cache-size")
        .unwrap_or_else(|| panic!("{}: no --max-cache-size for a bounded volume", inv.whence));
    assert!(
        bytes(&max) < bytes(limit),
        "{}: --max-cache-size {max} does not fit the volume's sizeLimit {limit}",
        inv.whence
    );
}

fn check_not_root(w: &Value, c: &Value, whence: &str) {
    let pod = at(w, "spec.template.spec.securityContext");
    let own = at(c, "securityContext");
    let setting = |key: &str| {
        own.and_then(|s| s.get(key))
            .or(pod.and_then(|s| s.get(key)))
    };
    assert_eq!(
        setting("runAsNonRoot").and_then(Value::as_bool),
        Some(true),
        "{whence}"
    );
    let uid = setting("runAsUser").and_then(Value::as_u64);
    assert!(uid.is_some_and(|u| u != 0), "{whence}: runAsUser {uid:?}");
    assert_eq!(
        own.and_then(|s| s.get("allowPrivilegeEscalation"))
            .and_then(Value::as_bool),
        Some(false),
        "{whence}"
    );
}

/// `--peers-dns NAME.NAMESPACE.svc…:PORT` names a headless Service that selects this workload,
/// on the port the node advertises and listens on.
fn check_peers_dns(objects: &[(String, Value)], w: &Value, c: &Value, inv: &Invocation) {
    let Some(dns) = inv.setting("peers-dns") else {
        return;
    };
    let (host, dns_port) = dns.rsplit_once(':').unwrap();
    let mut labels = host.split('.');
    let (svc, ns) = (labels.next().unwrap(), labels.next().unwrap());
    assert_eq!(labels.next(), Some("svc"), "{}: {host}", inv.whence);
    let service = objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| text(o, "kind") == "Service" && name_of(o) == svc && namespace_of(o) == ns)
        .unwrap_or_else(|| panic!("{}: --peers-dns names no Service {svc} in {ns}", inv.whence));
    assert_eq!(
        at(service, "spec.clusterIP").and_then(Value::as_str),
        Some("None")
    );
    assert!(
        selects(&strings(at(service, "spec.selector")), w),
        "{}: {svc}",
        inv.whence
    );
    let ports: Vec<String> = list(service, "spec.ports")
        .iter()
        .map(|p| at(p, "port").unwrap().as_u64().unwrap().to_string())
        .collect();
    assert!(
        ports.iter().any(|p| p == dns_port),
        "{}: {svc} ports {ports:?}",
        inv.whence
    );
    let advertise = inv.setting("advertise").unwrap();
    assert!(
        advertise.ends_with(&format!(":{dns_port}")),
        "{}: {advertise}",
        inv.whence
    );
    let listen = inv.setting("listen").unwrap();
    assert!(
        listen.ends_with(&format!(":{dns_port}")),
        "{}: listens on {listen}",
        inv.whence
    );
    let declared = port(c, &Value::Number(dns_port.parse::<u64>().unwrap().into()));
    assert!(
        declared.is_some(),
        "{}: no container port {dns_port}",
        inv.whence
    );
}

// ---------------------------------------------------------------------------------------------
// docker compose

/// The compose file's directory and its one document.
fn compose() -> (PathBuf, Value) {
    let files = deploy_files(&["compose.yml", "compose.yaml"]);
    assert_eq!(files.len(), 1, "one compose file expected: {files:?}");
    let mut docs = documents(&files[0]);
    assert_eq!(docs.len(), 1);
    (files[0].parent().unwrap().to_owned(), docs.remove(0))
}

/// `SOURCE:TARGET[:MODE]` of a service's volume.
fn volume_parts(v: &Value) -> (String, String) {
    let spec = v.as_str().expect("volumes in the short syntax");
    let mut parts = spec.split(':');
    let source = parts.next().unwrap().to_owned();
    (source, parts.next().expect("SOURCE:TARGET").to_owned())
}

/// A service that runs the image built from this repository with its own entrypoint: a node.
fn compose_node(name: &str, svc: &Value, dir: &Path) -> Option<Invocation> {
    let context = at(svc, "build.context").and_then(Value::as_str)?;
    let built_here = dir.join(context).canonicalize().ok() == root().canonicalize().ok();
    if !built_here || svc.get("entrypoint").is_some() {
        return None;
    }
    let command = list(svc, "command").iter();
    let argv = command.map(|w| w.as_str().unwrap().to_owned()).collect();
    let mounts = list(svc, "volumes")
        .iter()
        .map(|v| (volume_parts(v).1, None));
    Some(Invocation {
        whence: format!("compose service {name}"),
        argv,
        env: strings(svc.get("environment")),
        mounts: mounts.collect(),
    })
}

/// Services, their dependencies, volumes, bind-mounted files and build contexts all exist, and
/// every named volume is used.
#[test]
fn compose_file_has_its_parts() {
    let (dir, doc) = compose();
    assert!(
        doc.get("name").and_then(Value::as_str).is_some(),
        "no project name"
    );
    let services = doc.get("services").and_then(Value::as_mapping).unwrap();
    let declared: BTreeSet<String> = strings(doc.get("volumes")).into_keys().collect();
    let mut used = BTreeSet::new();
    let mut published = BTreeSet::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        assert!(
            svc.get("image").is_some() || svc.get("build").is_some(),
            "{name}"
        );
        if let Some(context) = at(svc, "build.context").and_then(Value::as_str) {
            assert!(
                dir.join(context).join("Dockerfile").is_file(),
                "{name}: {context}"
            );
        }
        let deps = svc.get("depends_on").and_then(Value::as_mapping);
        for dep in deps.into_iter().flat_map(Mapping::keys) {
            assert!(
                services.contains_key(dep),
                "{name} depends on unknown {dep:?}"
            );
        }
        for v in list(svc, "volumes") {
            let (source, _) = volume_parts(v);
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    dir.join(&source).exists(),
                    "{name}: {source} does not exist"
                );
            } else {
                assert!(
                    declared.contains(&source),
                    "{name}: volume {source} not declared"
                );
                used.insert(source);
            }
        }
        for p in list(svc, "ports") {
            let p = p.as_str().unwrap();
            assert!(
                p.starts_with("127.0.0.1:"),
                "{name}: {p} is published beyond loopback"
            );
            assert!(
                published.insert(p.rsplit_once(':').unwrap().0.to_owned()),
                "{p} twice"
            );
        }
    }
    assert_eq!(used, declared, "declared volumes that no service uses");
}

/// The nodes form one fleet: the peer list is exactly the nodes' service URLs, each node
/// advertises its own, the files they read are in their volumes and made by the set-up script,
/// and `config check` accepts each node's settings.
#[test]
fn compose_nodes_form_one_fleet_and_start() {
    let (dir, doc) = compose();
    let services = doc.get("services").and_then(Value::as_mapping).unwrap();
    let nodes: Vec<(String, Invocation)> = services
        .iter()
        .filter_map(|(n, s)| {
            let n = n.as_str().unwrap();
            compose_node(n, s, &dir).map(|inv| (n.to_owned(), inv))
        })
        .collect();
    assert!(nodes.len() >= 3, "a fleet of three nodes expected");
    let scripts: String = deploy_files(&[".sh"])
        .iter()
        .filter(|s| s.starts_with(&dir))
        .map(|s| std::fs::read_to_string(s).unwrap())
        .collect();
    for (name, inv) in &nodes {
        let words = inv.check_names();
        assert!(
            words.is_empty() || words == ["run"],
            "{name} runs {words:?}"
        );
        let port = inv
            .setting("listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        let url = |service: &str| format!("http://{service}:{port}");
        let peers: BTreeSet<String> = inv
            .setting("peer")
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect();
        let expected: BTreeSet<String> = nodes.iter().map(|(n, _)| url(n)).collect();
        assert_eq!(peers, expected, "{name}: the peers are not the nodes");
        assert_eq!(inv.setting("advertise"), Some(url(name)), "{name}");
        for flag in ["peer-secret-file", "secret-access-key-file"] {
            let path = inv.setting(flag).unwrap();
            let file = Path::new(&path).file_name().unwrap().to_string_lossy();
            assert!(
                scripts.contains(&*file),
                "{name}: no set-up script makes {path}"
            );
        }
        inv.check_mounted();
        inv.config_check();
    }
}

/// Every `regproxy …` command in `deploy/`'s shell scripts uses subcommands and flags the binary
/// has.
#[test]
fn scripts_call_regproxy_as_it_is() {
    const OPERATORS: &[&str] = &["|", "||", "&&", ";", "then", "do", "else"];
    let mut calls = 0;
    for script in deploy_files(&[".sh"]) {
        let text = std::fs::read_to_string(&script)
            .unwrap()
            .replace("\\\n", " ");
        for (n, line) in text.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(i) = words.iter().position(|w| *w == "regproxy") else {
                continue;
            };
            if i > 0 && !OPERATORS.contains(&words[i - 1]) {
                continue; // a word in a comment or a string, not a command
            }
            let argv: Vec<String> = words[i + 1..]
                .iter()
                .take_while(|w| !OPERATORS.contains(w) && !w.contains('>'))
                .map(|w| w.trim_matches('"').to_owned())
                .collect();
            check_argv(&argv, &format!("{}:{}", script.display(), n + 1));
            calls += 1;
        }
    }
    assert!(calls >= 2, "expected the set-up script's regproxy commands");
}

// ---------------------------------------------------------------------------------------------
// The compose example's set-up against a real Garage

/// A Garage server, killed on drop.
struct GarageServer(std::process::Child);

impl Drop for GarageServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` signed with `key:secret` for Garage; the HTTP status and the body.
fn s3_curl(key: &str, secret: &str, args: &[&str]) -> (String, String) {
    let out = support::run_with_timeout(
        Command::new("curl")
            .args([
                "-sS",
                "-w",
                "\n%{http_code}",
                "--aws-sigv4",
                "aws:amz:garage:s3",
            ])
            .args(["--user", &format!("{key}:{secret}")])
            .args(["-H", "x-amz-content-sha256:UNSIGNED-PAYLOAD"])
            .args(args),
        std::time::Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_owned(), body.to_owned())
}

/// init.sh, as the compose file runs it, with the compose file's settings, against a Garage
/// configured by the compose file's garage.toml (on loopback ports, in a temporary directory):
/// it lays out the cluster, makes the keys and the bucket the nodes use, lets the nodes' key
/// read, write, list and delete but not set the lifecycle, applies regproxy's lifecycle rules,
/// and runs again without failing.
#[test]
fn compose_init_sets_up_garage_for_the_nodes() {
    support::require_tool("garage");
    let (dir, doc) = compose();
    let setup = strings(at(&doc, "services.garage-init.environment"));
    let node = strings(at(&doc, "services.regproxy-1.environment"));
    let (bucket, prefix) = (&setup["BUCKET"], &setup["PREFIX"]);
    assert_eq!(
        node["REGPROXY_SHARED_STORE"],
        format!("s3://{bucket}/{prefix}")
    );
    assert_eq!(node["REGPROXY_ACCESS_KEY_ID"], setup["FLEET_KEY_ID"]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ports = [
        support::free_port(),
        support::free_port(),
        support::free_port(),
    ];
    let mut toml = std::fs::read_to_string(dir.join("garage.toml")).unwrap();
    let region = &node["REGPROXY_SHARED_STORE_REGION"];
    let signs_for = format!("s3_region = \"{region}\"");
    assert!(
        toml.contains(&signs_for),
        "the nodes sign for {region}, Garage is not it"
    );
    for (from, to) in [
        ("127.0.0.1:3901", format!("127.0.0.1:{}", ports[1])),
        ("0.0.0.0:3901", format!("127.0.0.1:{}", ports[1])),
        ("0.0.0.0:3900", format!("127.0.0.1:{}", ports[0])),
        ("0.0.0.0:3903", format!("127.0.0.1:{}", ports[2])),
        ("/var/lib/garage", t.join("data").display().to_string()),
        (
            "/run/secrets/garage",
            t.join("garage").display().to_string(),
        ),
    ] {
        assert!(toml.contains(from), "garage.toml has no {from}");
        toml = toml.replace(from, &to);
    }
    std::fs::write(t.join("garage.toml"), toml).unwrap();
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(t).unwrap().uid().to_string()
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_regproxy")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let s3 = format!("http://127.0.0.1:{}", ports[0]);
    let init = |step: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg(dir.join("init.sh"))
            .arg(step)
            .envs(&setup)
            .env("PATH", &path);
        cmd.env("FLEET_SECRETS", t.join("fleet"))
            .env("GARAGE_SECRETS", t.join("garage"))
            .env("CA_DIR", t.join("ca"))
            .env("NODE_UID", &uid)
            .env("GARAGE_ADMIN", format!("http://127.0.0.1:{}", ports[2]))
            .env("GARAGE_S3", &s3);
        let out = support::run_with_timeout(&mut cmd, std::time::Duration::from_secs(120));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "init.sh {step}: {said}");
        said
    };
    init("secrets");
    let log = std::fs::File::create(t.join("garage.log")).unwrap();
    let _garage = GarageServer(
        Command::new("garage")
            .args(["-c", &t.join("garage.toml").display().to_string(), "server"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert!(init("garage").contains("layout applied"));
    assert!(
        !init("garage").contains("layout applied"),
        "a second run changed the layout"
    );

    let secret = |file: &str| std::fs::read_to_string(t.join(file)).unwrap();
    let (admin, admin_secret) = (&setup["ADMIN_KEY_ID"], secret("garage/admin-key-secret"));
    let (fleet, fleet_secret) = (&setup["FLEET_KEY_ID"], secret("fleet/s3-secret"));
    let lifecycle_url = format!("{s3}/{bucket}?lifecycle=");
    let (status, applied) = s3_curl(admin, &admin_secret, &[&lifecycle_url]);
    assert_eq!(status, "200", "{applied}");
    let printed = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args([
            "--shared-store",
            &node["REGPROXY_SHARED_STORE"],
            "shared-store",
            "lifecycle",
        ])
        .args(["--expire-days", &setup["EXPIRE_DAYS"], "--xml"])
        .output()
        .unwrap();
    // Garage answers with an XML declaration and without line breaks.
    let strip = |xml: &str| -> String {
        let body = xml
            .strip_prefix("<?xml")
            .map_or(xml, |r| r.split_once("?>").unwrap().1);
        body.lines().map(str::trim).collect()
    };
    assert_eq!(
        strip(&applied),
        strip(&String::from_utf8_lossy(&printed.stdout))
    );

    let object = format!("{s3}/{bucket}/{prefix}/blobs/sha256/deploy-test");
    let list = format!("{s3}/{bucket}?list-type=2&prefix={prefix}%2F");
    let fleet_may = |args: &[&str]| s3_curl(fleet, &fleet_secret, args).0;
    assert_eq!(
        fleet_may(&["-X", "PUT", "--data-binary", "bytes", &object]),
        "200"
    );
    assert_eq!(fleet_may(&["-I", &object]), "200");
    assert_eq!(fleet_may(&[&list]), "200");
    assert_eq!(fleet_may(&["-X", "DELETE", &object]), "204");
    let put_rules = ["-X", "PUT", "--data-binary", "<x/>", lifecycle_url.as_str()];
    assert_eq!(
        fleet_may(&put_rules),
        "403",
        "the nodes' key may set the lifecycle"
    );
}
