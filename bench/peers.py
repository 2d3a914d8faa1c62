"""The other processes a bench run needs: the upstream app and an OpenSSH reverse tunnel.

Each starts on free loopback ports in the run's temp dir, is ready when a TCP connect works,
and is a `Child` the caller stops (TESTBED.md has the recipes these follow).
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from apptunnel.demo import Child, free_port, port_in_use, wait_until

SSHD = "/usr/sbin/sshd"


def start_nginx(root: Path, bulk_dir: Path, upload_port: int) -> tuple[Child, int]:
    """nginx as the upstream app: `hello\\n` at /, bulk_dir's files under /bulk/, and
    /upload passed unbuffered to the upload sink on `upload_port` (bench/bulk.py).

    bulk_dir must be readable by nginx's worker (`nobody` when the bench runs as root), so
    it lives outside the run's private temp dir.
    """
    port = free_port()
    base = root / "nginx"
    for sub in ("logs", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    temp = base / "tmp"
    (base / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {base}/nginx.pid; error_log {base}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  sendfile on; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port};
    location / {{ return 200 "hello\\n"; }}
    location /bulk/ {{ alias {bulk_dir}/; }}
    location = /upload {{ client_max_body_size 0; proxy_pass http://127.0.0.1:{upload_port};
      proxy_http_version 1.1; proxy_request_buffering off; proxy_buffering off; }} }} }}
""")
    child = Child("nginx", [_nginx(), "-p", str(base), "-c", str(base / "nginx.conf"),
                            "-e", str(base / "logs" / "error.log")], root, root / "nginx.log")
    wait_until(lambda: port_in_use(port), 10, "nginx to listen", child)
    return child, port


def _nginx() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def have_nginx() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def _p256_certificate(base: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1, as a user's nginx would have."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = base / "front.crt", base / "front.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def start_nginx_tls_front(root: Path, upstream_port: int) -> tuple[Child, int]:
    """nginx terminating TLS in front of `upstream_port` (an `ssh -R` forward): the stack a
    user would build by hand. One worker, a P-256 certificate, HTTP/1.1 keep-alive to the
    upstream, bodies streamed both ways (no buffering to disk)."""
    port = free_port()
    base = root / "nginx-front"
    for sub in ("logs", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    temp = base / "tmp"
    cert, key = _p256_certificate(base)
    (base / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {base}/nginx.pid; error_log {base}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  keepalive_requests 1000000;
  upstream tunnel {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://tunnel; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      client_max_body_size 0; proxy_request_buffering off; proxy_buffering off; }} }} }}
""")
    child = Child("nginx TLS front", [_nginx(), "-p", str(base), "-c", str(base / "nginx.conf"),
                                      "-e", str(base / "logs" / "error.log")],
                  root, root / "nginx-front.log")
    wait_until(lambda: port_in_use(port), 10, "the nginx TLS front to listen", child)
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


def start_ssh_reverse_tunnel(root: Path, target_port: int, name: str = "ssh"
                             ) -> tuple[list[Child], int]:
    """A throwaway sshd and `ssh -R` so 127.0.0.1:<returned port> reaches `target_port`.

    Returns the children (sshd, ssh) and the remote-forwarded port.
    """
    base = root / name
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
    sshd = Child("sshd", [SSHD, "-D", "-e", "-f", str(base / "sshd_config")], root, base / "sshd.log")
    children = [sshd]
    try:
        wait_until(lambda: port_in_use(sshd_port), 10, "sshd to listen", sshd)
        ssh = Child("ssh -R", [
            "ssh", "-F", "/dev/null", "-i", str(base / "id_ed25519"),
            "-o", f"UserKnownHostsFile={base}/known_hosts", "-o", "StrictHostKeyChecking=accept-new",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-p", str(sshd_port), "-N",
            "-R", f"127.0.0.1:{remote_port}:127.0.0.1:{target_port}",
            f"{getpass.getuser()}@127.0.0.1"], root, base / "ssh.log")
        children.append(ssh)
        wait_until(lambda: port_in_use(remote_port), 15, "the ssh -R tunnel", ssh)
    except BaseException:
        for child in reversed(children):
            child.stop()
        raise
    return children, remote_port
