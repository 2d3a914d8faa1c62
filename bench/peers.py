"""The other processes a bench run needs: the upstream app and an OpenSSH reverse tunnel.

Each starts on free loopback ports in the run's temp dir, is ready when a TCP connect works,
and is a `Child` the caller stops (TESTBED.md has the recipes these follow).
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
from pathlib import Path

from apptunnel.demo import Child, free_port, port_in_use, wait_until

SSHD = "/usr/sbin/sshd"


def start_nginx(root: Path) -> tuple[Child, int]:
    """nginx answering `hello\\n` to everything: an upstream that costs next to nothing."""
    port = free_port()
    base = root / "nginx"
    for sub in ("logs", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    temp = base / "tmp"
    (base / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {base}/nginx.pid; error_log {base}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello\\n"; }} }} }}
""")
    child = Child("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(base), "-c",
                            str(base / "nginx.conf"), "-e", str(base / "logs" / "error.log")],
                  root, root / "nginx.log")
    wait_until(lambda: port_in_use(port), 10, "nginx to listen", child)
    return child, port


def start_sample_app(root: Path) -> tuple[Child, int]:
    """The built-in sample app, when nginx is not installed."""
    port = free_port()
    child = Child("sample app", [sys.executable, "-m", "apptunnel.sample_app",
                                 "--listen", f"127.0.0.1:{port}"], root, root / "sample-app.log")
    wait_until(lambda: port_in_use(port), 15, "the sample app to listen", child)
    return child, port


def have_ssh() -> bool:
    return Path(SSHD).exists() and shutil.which("ssh") is not None and shutil.which("ssh-keygen")


def start_ssh_reverse_tunnel(root: Path, target_port: int) -> tuple[list[Child], int]:
    """A throwaway sshd and `ssh -R` so 127.0.0.1:<returned port> reaches `target_port`.

    Returns the children (sshd, ssh) and the remote-forwarded port.
    """
    base = root / "ssh"
    base.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)],
                       check=True, timeout=30)
    shutil.copy(base / "id_ed25519.pub", base / "authorized_keys")
    sshd_port, remote_port = free_port(), free_port()
    (base / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {sshd_port}\nHostKey {base}/host_ed25519\n"
        f"PidFile {base}/sshd.pid\nAuthorizedKeysFile {base}/authorized_keys\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nLogLevel ERROR\n")
    subprocess.run([SSHD, "-t", "-f", str(base / "sshd_config")], check=True, timeout=30)
    sshd = Child("sshd", [SSHD, "-D", "-e", "-f", str(base / "sshd_config")], root, root / "sshd.log")
    children = [sshd]
    try:
        wait_until(lambda: port_in_use(sshd_port), 10, "sshd to listen", sshd)
        ssh = Child("ssh -R", [
            "ssh", "-F", "/dev/null", "-i", str(base / "id_ed25519"),
            "-o", f"UserKnownHostsFile={base}/known_hosts", "-o", "StrictHostKeyChecking=accept-new",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-p", str(sshd_port), "-N",
            "-R", f"127.0.0.1:{remote_port}:127.0.0.1:{target_port}",
            f"{getpass.getuser()}@127.0.0.1"], root, root / "ssh.log")
        children.append(ssh)
        wait_until(lambda: port_in_use(remote_port), 15, "the ssh -R tunnel", ssh)
    except BaseException:
        for child in reversed(children):
            child.stop()
        raise
    return children, remote_port
