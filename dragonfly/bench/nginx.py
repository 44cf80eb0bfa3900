"""
nginx as the reference file server: started with a generated configuration
(C{sendfile on}, HTTP and HTTPS on 127.0.0.1), in the foreground as a
process the bench owns, with its pid file and logs in the bench's work
directory, and ended by its PID like every other process.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dragonfly.bench.common import (
    BenchError,
    Proc,
    Processes,
    TLSFiles,
    run_quiet,
    wait_port,
)
from dragonfly.devtools.processes import free_port

_CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen {ip}:{http_port};
        root {root};
    }}
    server {{
        listen {ip}:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""


def nginx_binary() -> str | None:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    return found


@dataclass
class Nginx:
    proc: Proc
    ip: str
    http_port: int
    https_port: int

    def http_url(self, name: str) -> str:
        return f"http://{self.ip}:{self.http_port}/{name}"

    def https_url(self, name: str) -> str:
        return f"https://{self.ip}:{self.https_port}/{name}"


def version() -> str:
    binary = nginx_binary()
    return run_quiet([binary, "-v"]).removeprefix("nginx version: ") if binary else ""


def start_nginx(
    procs: Processes, prefix: Path, root: Path, tls: TLSFiles, ip: str = "127.0.0.1"
) -> Nginx:
    """
    Serve C{root} over HTTP and HTTPS on C{ip}.

    @raise BenchError: if nginx is not installed or does not start.
    """
    binary = nginx_binary()
    if binary is None:
        raise BenchError("nginx is not installed (apt-get install nginx)")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    http_port, https_port = free_port(ip), free_port(ip)
    config = prefix / "nginx.conf"
    config.write_text(
        _CONFIG.format(
            prefix=prefix,
            ip=ip,
            http_port=http_port,
            https_port=https_port,
            root=root,
            cert=tls.cert,
            key=tls.key,
        )
    )
    # Run as root, nginx's workers drop to an unprivileged user, which must
    # be able to reach the files.
    for directory in [root, *root.parents]:
        if directory == Path("/tmp") or directory == Path("/"):
            break
        os.chmod(directory, 0o755)
    argv = [
        binary,
        "-p",
        str(prefix),
        "-c",
        str(config),
        "-e",
        str(prefix / "error.log"),
    ]
    proc = procs.start("nginx", argv, prefix / "nginx.out")
    try:
        wait_port(ip, http_port)
        wait_port(ip, https_port)
    except BenchError:
        log = prefix / "error.log"
        detail = log.read_text()[-1000:] if log.exists() else proc.output()
        raise BenchError(f"nginx did not start: {detail}") from None
    return Nginx(proc, ip, http_port, https_port)
