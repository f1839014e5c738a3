//! End to end over plain SPDY/3.1: kubectl 1.32 told not to use WebSocket (`KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`,
//! `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`) speaks what kubectl ≤ 1.29 and client-go's SPDY executor speak: an
//! `Upgrade: SPDY/3.1` through the API server's proxy to `windlass-kubelet`, `v4.channel.k8s.io` streams for exec and
//! attach, `portforward.k8s.io` for port-forward. The kubelet logs the transport of every session, which shows the
//! upgrade really was SPDY (and WebSocket when kubectl is left to its default).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use windlass_tests::kubelet_lab::{KubeletLab, TOOLS};
use windlass_tests::{require_privileged, wait_for, ChildGuard};

/// The environment that turns kubectl's WebSocket transports off.
const SPDY_ENV: [(&str, &str); 2] = [
    ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),
    ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"),
];

fn tools() -> Vec<&'static str> {
    let mut t = TOOLS.to_vec();
    t.push("script");
    t
}

fn running(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == true
}

/// Applies a one-container pod of the lab's httpd image (its own command when `command` is given) and waits until
/// it runs.
fn run_pod(lab: &KubeletLab, name: &str, command: Option<&str>) {
    let command = command
        .map(|c| format!("    command: [\"sh\", \"-c\", {c:?}]\n"))
        .unwrap_or_default();
    lab.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: {}\n  \
         restartPolicy: Never\n  containers:\n  - name: app\n    image: {}\n{command}",
        lab.node_name, lab.image
    ));
    lab.wait_pod(name, "running", Duration::from_secs(60), running);
}

/// kubectl (in the node's namespace, with the lab's kubeconfig) over SPDY.
fn kubectl_spdy(lab: &KubeletLab, args: &[&str]) -> Command {
    let mut c = lab.control.kubectl_cmd();
    c.envs(SPDY_ENV).args(args);
    c
}

fn output(c: &mut Command) -> Output {
    c.output().expect("run kubectl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The kubelet's log lines of sessions of kind `what` ("exec session", "attach session", "port-forward session").
fn sessions(lab: &KubeletLab, what: &str) -> Vec<String> {
    lab.kubelet_log()
        .lines()
        .filter(|l| l.contains(what))
        .map(String::from)
        .collect()
}

/// The `transport` field of a session line (`transport="SPDY/3.1"`).
fn transport(line: &str) -> &str {
    line.split("transport=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .trim_matches('"')
}

#[test]
fn kubectl_exec_and_attach_over_plain_spdy_stream_stdio_exit_codes_and_a_terminal() {
    if !require_privileged(&tools()) {
        return;
    }
    let lab = KubeletLab::start();
    run_pod(&lab, "web", None);

    // Output on both streams and the command's exit code (from the v4 error stream's Status).
    let out = output(&mut kubectl_spdy(
        &lab,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 3",
        ],
    ));
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = output(&mut kubectl_spdy(&lab, &["exec", "web", "--", "true"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A session longer than client-go's 5 s ping period: the pings are answered and the session goes on.
    let out = output(&mut kubectl_spdy(
        &lab,
        &["exec", "web", "--", "sh", "-c", "sleep 6; echo still-here"],
    ));
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // kubectl 1.29 knows nothing but SPDY for exec.
    let out = output(lab.control.kubectl_version_cmd(Some("1.29")).args([
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo from-1.29; exit 2",
    ]));
    assert_eq!(text(&out.stdout), "from-1.29\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // stdin reaches the process and its end (the client's FIN) ends `cat`.
    let mut cat = kubectl_spdy(&lab, &["exec", "-i", "web", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl exec -i");
    cat.stdin
        .take()
        .expect("stdin")
        .write_all(b"from stdin\nline two\n")
        .expect("write stdin");
    let out = cat.wait_with_output().expect("kubectl exec -i");
    assert_eq!(text(&out.stdout), "from stdin\nline two\n");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A terminal (`script` gives kubectl one): its size, set before kubectl starts, arrives on the resize stream.
    let kubectl = format!(
        "stty cols 100 rows 30; ip netns exec {} env KUBECONFIG={} HOME={} {} kubectl exec -it web -- sh -c \
         'for i in $(seq 100); do [ \"$(stty size)\" = \"30 100\" ] && break; sleep 0.1; done; \
         echo size=$(stty size); tty -s && echo is-a-tty; exit 4'",
        lab.netns.name(),
        lab.control.kubeconfig().display(),
        lab.control.data_dir().display(),
        SPDY_ENV.map(|(k, v)| format!("{k}={v}")).join(" "),
    );
    let tty = Command::new("script")
        .args(["-qec", &kubectl, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            // Keep script's stdin open until kubectl is done.
            let _stdin = c.stdin.take();
            c.wait_with_output()
        })
        .expect("script");
    let shown = text(&tty.stdout);
    assert!(
        shown.contains("size=30 100"),
        "{shown:?} / {}",
        text(&tty.stderr)
    );
    assert!(shown.contains("is-a-tty"), "{shown:?}");
    assert_eq!(tty.status.code(), Some(4), "{shown:?}");

    // attach: the container's output from the moment of attaching, on stdout and stderr, until it exits.
    run_pod(
        &lab,
        "talker",
        Some("echo started; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo to-out; echo to-err >&2; sleep 1"),
    );
    let attached_before = sessions(&lab, "attach session").len();
    let mut attach = ChildGuard::spawn(
        kubectl_spdy(&lab, &["attach", "talker", "-c", "app"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("kubectl attach");
    // The kubelet logs the session once it fixed where the output starts.
    wait_for("the attach session", Duration::from_secs(30), || {
        (sessions(&lab, "attach session").len() > attached_before).then_some(())
    });
    let out = output(&mut kubectl_spdy(
        &lab,
        &["exec", "talker", "--", "touch", "/tmp/go"],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = wait_for("kubectl attach to end", Duration::from_secs(30), || {
        attach.child_mut().try_wait().ok().flatten()
    });
    let (mut stdout, mut stderr) = (String::new(), String::new());
    use std::io::Read;
    let child = attach.child_mut();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(stdout, "to-out\n", "{stderr}");
    assert!(stderr.contains("to-err"), "{stderr}");
    assert!(status.success(), "{status}: {stderr}");

    // Every session above was SPDY; kubectl left to its default uses WebSocket.
    let execs = sessions(&lab, "exec session");
    assert!(execs.len() >= 7, "{execs:#?}");
    for l in execs.iter().chain(&sessions(&lab, "attach session")) {
        assert!(
            transport(l) == "SPDY/3.1" && l.contains("v4.channel.k8s.io"),
            "{l}"
        );
    }
    let out = output(
        lab.control
            .kubectl_cmd()
            .args(["exec", "web", "--", "true"]),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last = sessions(&lab, "exec session").pop().unwrap_or_default();
    assert_eq!(transport(&last), "WebSocket", "{last}");
}

#[test]
fn kubectl_port_forward_over_plain_spdy_fetches_from_the_pods_httpd() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    run_pod(&lab, "web", None);
    let mut pf = ChildGuard::spawn(
        kubectl_spdy(
            &lab,
            &["port-forward", "pod/web", ":80", "--address", "127.0.0.1"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null()),
    )
    .expect("kubectl port-forward");
    // Keep reading kubectl's stdout: it writes a line per connection, and a closed pipe would kill it.
    let lines = pf.stdout_lines();
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("kubectl port-forward listening");
    let local = windlass_tests::control::forwarded_local_port(&line);
    // Two connections in a row (kubectl listens in the node's namespace): each is a pair of streams in the one
    // SPDY connection.
    for attempt in 0..2 {
        let got = lab.http_get("127.0.0.1", local);
        assert!(
            got.as_deref()
                .is_ok_and(|r| r.contains("200 OK") && r.contains("hi")),
            "attempt {attempt}: {got:?}\nkubelet log:\n{}",
            lab.kubelet_log()
        );
    }
    let forwards = sessions(&lab, "port-forward session");
    assert_eq!(forwards.len(), 1, "{forwards:#?}");
    assert_eq!(transport(&forwards[0]), "SPDY/3.1", "{}", forwards[0]);
    assert!(
        forwards[0].contains("portforward.k8s.io"),
        "{}",
        forwards[0]
    );
}
