"""Two "hosts" on one machine: two network namespaces joined by a veth pair (`two_hosts`); or
four, each joined by a veth pair to a bridge in a fifth, hub namespace (`four_hosts`): a switch.

Import the fixture into a conftest (`from two_hosts import two_hosts`) and request `two_hosts`.
Each namespace sees only its own end of the pair and its own `lo`, so a process started in one
reaches the other only across the veth link, by the other's address: what two nodes on a
network see (a rendezvous that would pass over loopback by accident fails here).

Needs root and iproute2 (`ip netns`); skipped without them. The addresses are private
(10.213.7.0/24) and exist only inside the namespaces, so nothing on the machine's real
network is touched. Names carry the pid and a random suffix, so a second session (or the
leftovers of a crashed one) never collides; interface names stay within the kernel's 15 bytes.
"""
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loud_skip import skip_loudly

SUBNET_PREFIX = 24
ADDRESSES = ("10.213.7.1", "10.213.7.2", "10.213.7.3", "10.213.7.4")
# Node names each namespace resolves (as SLURM's hostlist "cznode[1-2]" names them): `ip netns
# exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts for what it runs.
HOSTNAMES = ("cznode1", "cznode2", "cznode3", "cznode4")
NETNS_ETC = Path("/etc/netns")
IP = shutil.which("ip") or "/usr/sbin/ip"  # absolute: popen's env may carry a short PATH


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@dataclass
class TwoHosts:
    namespaces: tuple[str, ...]   # `ip netns` names, one per host
    addresses: tuple[str, ...]    # IPv4 address of each namespace's veth end (/24)
    interfaces: tuple[str, ...]   # the veth end inside each namespace (GLOO_SOCKET_IFNAME)
    procs: list = field(default_factory=list)
    hostnames: tuple[str, ...] = HOSTNAMES[:2]  # resolve to `addresses` inside every namespace
    hub: str | None = None        # the namespace of the bridge joining more than two hosts

    def env(self, host: int, master_port: int = 29500) -> dict:
        """torch.distributed's rendezvous variables for a process on `host` (0, 1, ...), with
        host 0 as the master and the collectives pinned to the veth link."""
        return {"MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(master_port),
                "GLOO_SOCKET_IFNAME": self.interfaces[host],
                "NCCL_SOCKET_IFNAME": self.interfaces[host]}

    def popen(self, host: int, cmd, env: dict | None = None, disks: dict | None = None,
              **kwargs) -> subprocess.Popen:
        """Start `cmd` (a list) inside namespace `host` (0, 1, ...): `ip netns exec NS cmd`, with a
        /dev/shm of its own, as a separate machine has (POSIX shared memory would otherwise be
        shared by the two "hosts": streaming keys its state there by node). `env` is the whole
        environment, as for Popen (ip netns exec passes it on unchanged); `disks` maps a
        directory to the folder bind-mounted over it for this command alone (a local disk of the
        host's own: the same path holds another folder on each host, and the machine's own
        directory stays as it was); other keyword arguments go to Popen. Teardown kills it if
        it is still running."""
        # `ip netns exec` runs in a mount namespace of its own (slave to the machine's), so the
        # tmpfs and bind mounts made here are seen by this command alone.
        script = "mount -t tmpfs -o size=4g tmpfs /dev/shm"
        for target, source in (disks or {}).items():
            script += f" && mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}"
        own_shm = ["sh", "-c", script + ' && exec "$@"', "sh"]
        proc = subprocess.Popen([IP, "netns", "exec", self.namespaces[host], *own_shm, *map(str, cmd)],
                                env=env, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: int, cmd, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Like popen, waiting for the command; output captured as text."""
        return subprocess.run([IP, "netns", "exec", self.namespaces[host], *map(str, cmd)],
                              capture_output=True, text=True, timeout=timeout, **kwargs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def sweep_stale() -> None:
    """Delete the namespaces of earlier sessions that died before their teardown (names
    `czns<pid><4 hex><a-d, or h for a hub>` whose pid is gone); they would not collide, only pile up."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if re.fullmatch(r"czns\d+[0-9a-f]{4}[a-dh]", name) and not _pid_alive(int(name[4:-5])):
            destroy_two_hosts(TwoHosts((name,), ADDRESSES[:1], ("",)))


def create_two_hosts(count: int = 2) -> TwoHosts:
    """`count` hosts: two joined by one veth pair, more by a pair each to a bridge in a hub."""
    if os.geteuid() != 0:
        skip_loudly("no two-host network: `ip netns add` needs root")
    if not os.path.exists(IP):
        skip_loudly("no two-host network: `ip` is missing; run .ci/system-packages as root "
                    "(apt-get install iproute2)")
    sweep_stale()
    tag = f"{os.getpid()}{secrets.token_hex(2)}"       # <= 7 + 4 characters
    letters = "abcd"[:count]
    namespaces = tuple(f"czns{tag}{letter}" for letter in letters)
    interfaces = tuple(f"cz{tag}{letter}" for letter in letters)   # <= 14 characters of the 15 allowed
    first = _ip("netns", "add", namespaces[0], check=False)
    if first.returncode != 0:
        skip_loudly(f"no two-host network: `ip netns add` failed: {first.stderr.strip()}")
    hosts = TwoHosts(namespaces, ADDRESSES[:count], interfaces, hostnames=HOSTNAMES[:count],
                     hub=f"czns{tag}h" if count > 2 else None)
    try:
        for ns in namespaces[1:] + ((hosts.hub,) if hosts.hub else ()):
            _ip("netns", "add", ns)
        # Create each pair inside a namespace, then move one end: nothing, not even for a
        # moment, appears in the machine's own namespace.
        if hosts.hub is None:
            _ip("-n", namespaces[0], "link", "add", interfaces[0], "type", "veth",
                "peer", "name", interfaces[1], "netns", namespaces[1])
        else:
            _ip("-n", hosts.hub, "link", "add", "czbridge", "type", "bridge")
            _ip("-n", hosts.hub, "link", "set", "czbridge", "up")
            for ns, ifname in zip(namespaces, interfaces):
                _ip("-n", hosts.hub, "link", "add", ifname + "p", "type", "veth", "peer", "name", ifname, "netns", ns)
                _ip("-n", hosts.hub, "link", "set", ifname + "p", "master", "czbridge", "up")
        for ns, ifname, addr in zip(namespaces, interfaces, hosts.addresses):
            _ip("-n", ns, "addr", "add", f"{addr}/{SUBNET_PREFIX}", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{addr} {name}\n" for addr, name in zip(hosts.addresses, hosts.hostnames))
        for ns in namespaces:
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts_file)
    except BaseException:
        destroy_two_hosts(hosts)
        raise
    return hosts


def destroy_two_hosts(hosts: TwoHosts) -> None:
    """Kill what still runs inside (our Popens, then anything `ip netns pids` names), then
    delete the namespaces, which deletes the veth pairs and the bridge with them."""
    for proc in hosts.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for ns in hosts.namespaces + ((hosts.hub,) if hosts.hub else ()):
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "delete", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


@pytest.fixture(scope="session")
def two_hosts():
    """Two network namespaces joined by a veth pair (see the module docstring)."""
    hosts = create_two_hosts()
    try:
        yield hosts
    finally:
        destroy_two_hosts(hosts)


@pytest.fixture(scope="session")
def four_hosts():
    """Four network namespaces joined by a bridge (see the module docstring)."""
    hosts = create_two_hosts(4)
    try:
        yield hosts
    finally:
        destroy_two_hosts(hosts)
