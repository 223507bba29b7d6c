"""Bring the emulated Raspberry Pi up and down.

``up``: restore the cached aarch64 rootfs, install the agent and the TVM runtime (``/opt/edgekit-tvm``:
edgekit's ``ek_runner`` and the aarch64 ``libtvm_runtime.so``), bind-mount /proc, /dev and a Pi-like cpuinfo, start
OpenSSH's sshd on loopback (``QEMU_CPU=cortex-a72``, see the field notes), a pty-pair serial line
with the edgekit agent on the device end, and a small adbd; print one JSON object with the URLs.
``down``: stop every process running inside the rootfs, unmount, remove the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgekit.device.agent import AGENT_LAUNCHER, bundle_contents  # noqa: E402
from emulated_pi.rootfs import CACHE_DIR, ensure_binfmt, log, restore  # noqa: E402

RUN_DIR = Path(os.environ.get("EDGEKIT_PI_DIR", CACHE_DIR / "emulated-pi"))
QEMU_CPU = "cortex-a72"
DEVICE_AGENT_DIR = "/opt/edgekit-agent"
DEVICE_ROOT = "/root/.edgekit"
TVM_PREFIX = "/opt/edgekit-tvm"  # edgekit.device.runtimes.tvm_runner.DEFAULT_PREFIX
HERE = Path(__file__).resolve().parent


def pi_cpuinfo(n: int) -> str:
    block = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    )
    tail = "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated)\n"
    return "".join(block.format(i=i) for i in range(n)) + tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"emulated Pi: {what} did not come up within {timeout:g} s")


def ssh_banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(5)
            return s.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def chroot_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": QEMU_CPU,
    }


def spawn(args: list[str], log_file: Path) -> int:
    """Start a process in its own session (so down can end its group); returns its pid."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, env=chroot_env()
        )
    return proc.pid


def state_file() -> Path:
    return RUN_DIR / "state.json"


def install_agent(rootfs: Path) -> None:
    dest = rootfs / DEVICE_AGENT_DIR.lstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    for name, data in bundle_contents().items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    shutil.copy(HERE / "adbd.py", dest / "adbd.py")


def install_tvm_runtime(rootfs: Path) -> bool:
    """The TVM runtime the rpi targets name (libtvm_runtime.so, libtvm_ffi.so) and edgekit's runner for
    it, under /opt/edgekit-tvm: what a real Pi needs to run TVM artifacts without Python TVM."""
    try:
        from edgekit.compile import emulate

        emulate.install_device_runtime(rootfs / TVM_PREFIX.lstrip("/"))
        return True
    except Exception as exc:  # no cross compiler / runtime cache / host tvm: the device simply lacks TVM
        log(f"no TVM runtime on the device ({exc})")
        return False


def setup_ssh(rootfs: Path, port: int) -> dict[str, str]:
    etc = rootfs / "etc/ssh"
    host_key = etc / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    client_key = RUN_DIR / "id_ed25519"
    if not client_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client_key)], check=True)
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(str(client_key) + ".pub").read_text())
    (etc / "sshd_config_edgekit").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPidFile /run/sshd-edgekit.pid\nSubsystem sftp internal-sftp\n"
        f"SetEnv QEMU_CPU={QEMU_CPU}\nMaxStartups 20\nMaxSessions 20\nUseDNS no\n"
    )
    (rootfs / "run/sshd").mkdir(parents=True, exist_ok=True)
    known_hosts = RUN_DIR / "known_hosts"
    pub = Path(str(host_key) + ".pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return {"key": str(client_key), "known_hosts": str(known_hosts)}


def mount_all(rootfs: Path) -> list[str]:
    cpuinfo = RUN_DIR / "cpuinfo"
    cpuinfo.write_text(pi_cpuinfo(os.cpu_count() or 1))
    steps = [
        (["mount", "-t", "proc", "proc", str(rootfs / "proc")], rootfs / "proc"),
        (["mount", "--bind", str(cpuinfo), str(rootfs / "proc/cpuinfo")], rootfs / "proc/cpuinfo"),
        (["mount", "--bind", "/dev", str(rootfs / "dev")], rootfs / "dev"),
        (["mount", "--bind", "/dev/pts", str(rootfs / "dev/pts")], rootfs / "dev/pts"),
    ]
    mounted = []
    for cmd, target in steps:
        subprocess.run(cmd, check=True)
        mounted.append(str(target))
    return mounted


def up() -> dict:
    """Bring the device up (or report the one already up) and return its URLs."""
    if state_file().exists():
        state = json.loads(state_file().read_text())
        if all(_alive(p) for p in state["pids"].values()):
            return state["urls"]
        down()
    ensure_binfmt()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    rootfs = RUN_DIR / "rootfs"
    if rootfs.exists():
        _unmount_all(rootfs)
        discard(rootfs)
    t0 = time.monotonic()
    restore(rootfs)
    log(f"rootfs restored in {time.monotonic() - t0:.1f} s")
    install_agent(rootfs)
    tvm = install_tvm_runtime(rootfs)
    state: dict = {"rootfs": str(rootfs), "mounts": [], "pids": {}}
    state_file().write_text(json.dumps(state))
    state["mounts"] = mount_all(rootfs)
    state_file().write_text(json.dumps(state))
    logs = RUN_DIR / "logs"
    logs.mkdir(exist_ok=True)

    ssh_port = free_port()
    ssh = setup_ssh(rootfs, ssh_port)
    subprocess.run(
        ["chroot", str(rootfs), "/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config_edgekit"], check=True, env=chroot_env()
    )
    wait_for(lambda: (rootfs / "run/sshd-edgekit.pid").exists(), "sshd", 60)
    state["pids"]["sshd"] = int((rootfs / "run/sshd-edgekit.pid").read_text())

    host_tty, device_tty = RUN_DIR / "ttyHOST", RUN_DIR / "ttyDEVICE"
    state["pids"]["serial"] = spawn(
        [sys.executable, str(HERE / "ptyrelay.py"), str(host_tty), str(device_tty)], logs / "serial.log"
    )
    wait_for(lambda: host_tty.exists() and device_tty.exists(), "serial line", 10)
    device_pts = os.readlink(device_tty)
    agent = f"{DEVICE_AGENT_DIR}/{AGENT_LAUNCHER}"
    loop = f"while true; do python3 {agent} --serial {device_pts} --root {DEVICE_ROOT}; sleep 0.5; done"
    state["pids"]["serial_agent"] = spawn(["chroot", str(rootfs), "/bin/sh", "-c", loop], logs / "serial-agent.log")

    adb_port = free_port()
    state["pids"]["adbd"] = spawn(
        ["chroot", str(rootfs), "python3", f"{DEVICE_AGENT_DIR}/adbd.py", "--port", str(adb_port)], logs / "adbd.log"
    )
    wait_for(lambda: ssh_banner(ssh_port), "sshd", 60)
    wait_for(lambda: port_open(adb_port), "adbd", 60)
    state["urls"] = {
        "ssh": f"ssh://root@127.0.0.1:{ssh_port}?key={ssh['key']}&known_hosts={ssh['known_hosts']}",
        "serial": f"serial://{host_tty}?baud=921600",
        "adb": f"adb://127.0.0.1:{adb_port}",
        "rootfs": str(rootfs),
        "qemu_cpu": QEMU_CPU,
        "tvm_runtime": TVM_PREFIX if tvm else None,
    }
    state_file().write_text(json.dumps(state, indent=1))
    log(f"up in {time.monotonic() - t0:.1f} s")
    return state["urls"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _processes_in(rootfs: Path) -> list[int]:
    """Pids whose root directory is the rootfs (everything started inside it)."""
    pids = []
    real = os.path.realpath(rootfs)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/root") == real:
                    pids.append(int(entry))
    return pids


def _unmount_all(rootfs: Path) -> None:
    real = os.path.realpath(rootfs)
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f]
    for target in sorted((t for t in targets if t == real or t.startswith(real + "/")), key=len, reverse=True):
        subprocess.run(["umount", target], check=False)
        if subprocess.run(["mountpoint", "-q", target], check=False).returncode == 0:
            subprocess.run(["umount", "-l", target], check=False)


def discard(tree: Path) -> None:
    """Rename a tree out of the way (instant) and delete it in a detached low-priority process:
    removing ~11k files can take half a minute on a busy disk, and nothing waits for it."""
    if not tree.exists():
        return
    trash = RUN_DIR / f".trash-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(tree, trash)
    subprocess.Popen(
        ["nice", "-n", "19", "rm", "-rf", "--one-file-system", str(trash)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def down() -> None:
    """Stop everything the device runs, unmount, and delete the run directory (the cache stays)."""
    if not state_file().exists() and not (RUN_DIR / "rootfs").exists():
        return
    state = json.loads(state_file().read_text()) if state_file().exists() else {"pids": {}}
    rootfs = RUN_DIR / "rootfs"
    t0 = time.monotonic()
    for name, pid in state.get("pids", {}).items():
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM) if name != "sshd" else os.kill(pid, signal.SIGTERM)
    for _ in range(3):
        for pid in _processes_in(rootfs):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    adb_url = state.get("urls", {}).get("adb", "")
    if adb_url and shutil.which("adb"):
        subprocess.run(
            ["adb", "disconnect", adb_url.removeprefix("adb://")], capture_output=True, timeout=10, check=False
        )
    _unmount_all(rootfs)
    with open("/proc/mounts") as f:
        still = [line.split()[1] for line in f if line.split()[1].startswith(os.path.realpath(rootfs))]
    if still:
        raise RuntimeError(f"emulated Pi: still mounted, not deleting: {still}")
    discard(rootfs)
    for name in ("state.json", "ttyHOST", "ttyDEVICE", "cpuinfo", "known_hosts"):
        with contextlib.suppress(FileNotFoundError):
            (RUN_DIR / name).unlink()
    log(f"down in {time.monotonic() - t0:.1f} s")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print("usage: tools/emulated-pi up|down|status", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("emulated-pi: needs root (binfmt_misc, mounts, chroot)", file=sys.stderr)
        return 1
    if argv[0] == "up":
        print(json.dumps(up()))
    elif argv[0] == "down":
        down()
    else:
        print(state_file().read_text() if state_file().exists() else "{}")
    return 0
