"""Provisioning on an agent: its storage pools, volumes and networks; creating a VM from a base
image with a cloud-init seed, cloning and deleting VMs; the addresses of a guest. Asynchronous (SSH).

Creating and cloning are several commands on the host (volumes, an upload, a definition, a start).
A step that fails undoes every earlier step of the same request, in reverse (destroy, undefine,
delete the volumes it made), and the audit event says what failed and what was removed or could
not be: a failed request leaves nothing behind on the host that it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from typing import ClassVar

from core import domains, virsh
from core.commands import BridgeRequest, CloneRequest, NewVm
from core.domains import DiskSpec, DomainSpec
from core.errors import (
    FieldError,
    InsufficientStorage,
    PortalError,
    ValidationFailed,
    VirshFailed,
    VmNameTaken,
    VmNotFound,
    VmNotRunning,
    VmRunning,
    VolumeInUse,
    VolumeNotFound,
)
from core.model import AgentCredentials, Caller
from core.ports import CommandResult, SeedImages, SshKeys
from core.remote import RemoteCommands, parse_output
from core.results import CreatedVm, CreatedVolume, VmInfo
from core.validation import collect
from core.virsh import GuestInterface, Network, Pool, Volume
from core.vms import Progress, VmService

GIB = 1024**3
VOLUME_PARALLELISM = 4  # volume or domain XML asked at once from one host (its sshd allows 10 channels)
SEED_SUFFIX = "-seed.iso"
DISK_SUFFIX = ".qcow2"


class ProvisioningService:
    """Storage, networks and the life and death of VMs on the caller's agents."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, remote: RemoteCommands, vms: VmService, seeds: SeedImages | None, ssh_keys: SshKeys,
                 domain_type: str = "kvm", new_instance_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.remote = remote
        self.vms = vms
        self.seeds = seeds
        self.ssh_keys = ssh_keys
        if domain_type not in domains.DOMAIN_TYPES:
            raise ValueError(f"domain type must be one of {domains.DOMAIN_TYPES}")
        self.domain_type = domain_type  # kvm on real hosts; qemu (TCG) where there is no usable KVM
        self._new_instance_id = new_instance_id

    # ------------------------------------------------------------------ inventory

    async def list_pools(self, caller: Caller, agent_id: int) -> list[Pool]:
        """Every storage pool of the host with its sizes (``pool-list``, then ``pool-info --bytes``
        for each). A pool whose name the portal cannot pass to virsh safely is left out."""
        target = await self.remote.target(caller, agent_id)
        uri = target.agent.libvirt_uri
        listed = await self._run(caller, target, virsh.pool_names_command(uri))
        names = [n for n in await parse_output(virsh.parse_names, listed.stdout) if virsh.check_object_name(n) is None]
        results = await self._each(caller, target, [virsh.pool_info_command(uri, name) for name in names])
        pools = []
        for name, result in zip(names, results, strict=True):
            if result.exit_status == 0:  # a pool undefined in between is simply gone
                pools.append(virsh.parse_pool_info(result.stdout, name))
        return pools

    async def list_volumes(self, caller: Caller, agent_id: int, pool: str) -> list[Volume]:
        """The volumes of a pool, each with its path, format and sizes (``vol-list``, then
        ``vol-dumpxml`` for each); ``PoolNotFound`` for an unknown pool."""
        virsh.require_object_name(pool, "pool")
        target = await self.remote.target(caller, agent_id)
        return await self._volumes(caller, target, pool)

    async def list_networks(self, caller: Caller, agent_id: int) -> list[Network]:
        """Every libvirt network of the host (``net-list``, then ``net-info`` for each)."""
        target = await self.remote.target(caller, agent_id)
        uri = target.agent.libvirt_uri
        listed = await self._run(caller, target, virsh.network_names_command(uri))
        names = [n for n in await parse_output(virsh.parse_names, listed.stdout) if virsh.check_object_name(n) is None]
        results = await self._each(caller, target, [virsh.network_info_command(uri, name) for name in names])
        return [virsh.parse_network_info(r.stdout, name) for name, r in zip(names, results, strict=True)
                if r.exit_status == 0]

    async def _volumes(self, caller: Caller, target: AgentCredentials, pool: str) -> list[Volume]:
        uri = target.agent.libvirt_uri
        listed = await self.remote.run(caller, target, virsh.volume_names_command(uri, pool))
        virsh.raise_for_provisioning_failure(listed, pool=pool)
        rows = [(name, path) for name, path in await parse_output(virsh.parse_volume_list, listed.stdout)
                if virsh.check_object_name(name) is None]
        results = await self._each(caller, target, [virsh.volume_xml_command(uri, pool, name) for name, _ in rows])
        volumes = []
        for (name, path), result in zip(rows, results, strict=True):
            if result.exit_status == 0:
                volume = virsh.parse_volume_xml(result.stdout, name)
                volumes.append(volume if volume.path else Volume(name, path or None, volume.format,
                                                                 volume.capacity_bytes, volume.allocation_bytes))
        return volumes

    # ------------------------------------------------------------------ create

    async def create_vm(self, caller: Caller, agent_id: int, request: NewVm, *, wait: int | None = None,
                        progress: Progress | None = None, abandoned: asyncio.Event | None = None) -> CreatedVm:
        """Create a VM: a qcow2 disk in the pool (an overlay on ``base_volume``, or blank), a
        NoCloud seed volume uploaded over the SSH channel when ``cloud_init`` is given, the domain
        defined from XML the portal writes, then autostart and start as asked (and with ``wait``,
        the wait for ``running``). Checked first against the host: the name is free, the pool,
        base volume and network exist, vCPUs and memory fit the host, the disk fits the pool's free
        space. Audited as ``vm.create``; a failure midway removes what the request made."""
        name = request.name
        steps = _Steps(progress)
        try:
            files = await asyncio.to_thread(self._check_new_vm, request)
            if wait is not None and virsh.check_wait(wait) is not None:
                raise ValidationFailed.one("wait", virsh.check_wait(wait) or "")
            target = await self.remote.target(caller, agent_id)
            base = await self._preflight(caller, target, request)
        except PortalError as error:
            await self._audit(caller, "vm.create", agent_id, name, error.code, error.detail)
            raise
        uri = target.agent.libvirt_uri
        pool = request.disk.pool
        size = request.disk.size_gib * GIB
        disk = CreatedVolume(pool=pool, name=name + DISK_SUFFIX, format="qcow2", capacity_bytes=size)
        made = _Made()
        try:
            steps.tell("creating the disk")
            await self._step(caller, target, virsh.volume_create_command(
                uri, pool, disk.name, size, "qcow2", None if base is None else (base.name, base.format or "qcow2")),
                pool=pool, volume=disk.name)
            made.volumes.append(disk)
            disks = [DiskSpec(pool, disk.name, "qcow2")]
            if files is not None:
                disks.append(await self._upload_seed(caller, target, name, pool, files, made, steps))
            spec = DomainSpec(name=name, vcpus=request.vcpus, memory_mib=request.memory_mib, disks=disks,
                              network=request.network if isinstance(request.network, str) else None,
                              bridge=request.network.bridge if isinstance(request.network, BridgeRequest) else None,
                              domain_type=self.domain_type)
            await self._define(caller, target, domains.domain_xml(spec), name, made, steps)
            await self._finish(caller, target, name, request.autostart, request.start, made, steps)
        except BaseException as error:
            await self._undo_and_audit(caller, "vm.create", agent_id, target, name, made, error)
            raise
        await self._audit(caller, "vm.create", agent_id, name, "ok", made.describe(request.start))
        return await self._created(caller, target, name, made, request.start, wait, progress, abandoned)

    def _check_new_vm(self, request: NewVm) -> dict[str, bytes] | None:
        """Every rule a request can be checked by without the host; the seed's files (or None)."""
        errors = collect(
            ("name", virsh.check_vm_name(request.name)),
            ("name", None if len(request.name) + len(SEED_SUFFIX) <= virsh.VM_NAME_MAX else
             f"must be at most {virsh.VM_NAME_MAX - len(SEED_SUFFIX)} characters (its volumes are named after it)"),
            ("vcpus", None if request.vcpus >= 1 else "must be at least 1"),
            ("memory_mib", None if request.memory_mib >= 64 else "must be at least 64"),
            ("disk.pool", virsh.check_object_name(request.disk.pool)),
            ("disk.size_gib", None if 1 <= request.disk.size_gib <= 65536 else "must be 1 to 65536"),
            ("disk.base_volume", None if request.disk.base_volume is None
             else virsh.check_object_name(request.disk.base_volume)),
            ("network", virsh.check_object_name(request.network) if isinstance(request.network, str) else None),
            ("network.bridge", domains.check_bridge(request.network.bridge)
             if isinstance(request.network, BridgeRequest) else None),
        )
        files = None
        if request.cloud_init is not None:
            files, more = self._seed(request)
            errors += more
        if errors:
            raise ValidationFailed(errors)
        return files

    def _seed(self, request: NewVm) -> tuple[dict[str, bytes] | None, list[FieldError]]:
        cloud = request.cloud_init
        assert cloud is not None
        errors: list[FieldError] = []
        hostname = cloud.hostname if cloud.hostname is not None else request.name
        problem = domains.check_hostname(hostname)
        if problem is not None:
            field = "cloud_init.hostname"
            errors.append(FieldError(field, problem if cloud.hostname is not None else
                                     f"is needed: the VM name is not a host name ({problem})"))
        keys = []
        if len(cloud.ssh_authorized_keys) > 100:
            errors.append(FieldError("cloud_init.ssh_authorized_keys", "must hold at most 100 keys"))
        for index, key in enumerate(cloud.ssh_authorized_keys[:100]):
            try:
                self.ssh_keys.parse_host_key(key)
                keys.append(key.strip())
            except ValueError as error:
                errors.append(FieldError(f"cloud_init.ssh_authorized_keys[{index}]", str(error)))
        for field, text in (("cloud_init.user_data", cloud.user_data), ("cloud_init.network_config",
                                                                       cloud.network_config)):
            if text is None:
                continue
            if len(text.encode("utf-8", "surrogatepass")) > domains.USER_DATA_MAX:
                errors.append(FieldError(field, f"must be at most {domains.USER_DATA_MAX // 1024} KiB"))
            elif (field.endswith("network_config") or text.startswith("#cloud-config")) and self.seeds is not None:
                yaml_problem = self.seeds.yaml_problem(text)
                if yaml_problem is not None:
                    errors.append(FieldError(field, yaml_problem))
        if self.seeds is None:
            errors.append(FieldError("cloud_init", "this portal was built without a seed image builder"))
        if errors:
            return None, errors
        return domains.seed_files(f"iid-{self._new_instance_id()}", hostname, keys, cloud.user_data,
                                  cloud.network_config), []

    async def _preflight(self, caller: Caller, target: AgentCredentials, request: NewVm) -> Volume | None:
        """What the host must say before anything is made: answers the base volume (or None)."""
        uri = target.agent.libvirt_uri
        disk = request.disk
        argvs = [virsh.dominfo_command(uri, request.name), virsh.nodeinfo_command(uri),
                 virsh.pool_info_command(uri, disk.pool)]
        if disk.base_volume is not None:
            argvs.append(virsh.volume_xml_command(uri, disk.pool, disk.base_volume))
        if isinstance(request.network, str):
            argvs.append(virsh.network_info_command(uri, request.network))
        results = await self._each(caller, target, argvs)
        existing, node, pool_info = results[0], results[1], results[2]
        if existing.exit_status == 0:
            raise VmNameTaken(f"this agent already has a VM named {request.name!r}")
        with contextlib.suppress(VmNotFound):
            virsh.raise_for_failure(existing, request.name)
        virsh.raise_for_failure(node)
        virsh.raise_for_provisioning_failure(pool_info, pool=disk.pool)
        rest = results[3:]
        base = None
        if disk.base_volume is not None:
            found = rest.pop(0)
            virsh.raise_for_provisioning_failure(found, pool=disk.pool, volume=disk.base_volume)
            base = virsh.parse_volume_xml(found.stdout, disk.base_volume)
        if isinstance(request.network, str):
            virsh.raise_for_provisioning_failure(rest.pop(0), network=request.network)
        host = virsh.parse_nodeinfo(node.stdout)
        pool = virsh.parse_pool_info(pool_info.stdout, disk.pool)
        size = disk.size_gib * GIB
        errors = collect(
            ("vcpus", None if host.cpus is None or request.vcpus <= host.cpus
             else f"must be at most the host's {host.cpus} CPUs"),
            ("memory_mib", None if host.memory_kib is None or request.memory_mib * 1024 <= host.memory_kib
             else f"must be at most the host's memory ({host.memory_kib // 1024} MiB)"),
            ("disk.size_gib", None if base is None or base.capacity_bytes is None or size >= base.capacity_bytes
             else f"must be at least the base volume's size ({-(-base.capacity_bytes // GIB)} GiB)"),
        )
        if base is not None and base.format not in ("qcow2", "raw"):
            errors.append(FieldError("disk.base_volume", f"must be a qcow2 or raw volume (it is {base.format})"))
        if errors:
            raise ValidationFailed(errors)
        if pool.available_bytes is not None and size > pool.available_bytes:
            raise InsufficientStorage(f"pool {disk.pool!r} has {pool.available_bytes} bytes free; the disk needs "
                                      f"{size}")
        return base

    async def _upload_seed(self, caller: Caller, target: AgentCredentials, name: str, pool: str,
                           files: dict[str, bytes], made: _Made, steps: _Steps) -> DiskSpec:
        assert self.seeds is not None
        uri = target.agent.libvirt_uri
        image = await asyncio.to_thread(self.seeds.iso, files, domains.SEED_LABEL)
        seed = CreatedVolume(pool=pool, name=name + SEED_SUFFIX, format="raw", capacity_bytes=len(image))
        steps.tell("creating the cloud-init seed volume")
        await self._step(caller, target, virsh.volume_create_command(uri, pool, seed.name, len(image), "raw"),
                         pool=pool, volume=seed.name)
        made.volumes.append(seed)
        steps.tell("uploading the cloud-init seed")
        await self._step(caller, target, virsh.volume_upload_command(uri, pool, seed.name), stdin=image,
                         pool=pool, volume=seed.name)
        return DiskSpec(pool, seed.name, "raw", cdrom=True)

    async def _define(self, caller: Caller, target: AgentCredentials, xml: str, name: str, made: _Made,
                      steps: _Steps) -> None:
        steps.tell("defining the VM")
        await self._step(caller, target, virsh.define_command(target.agent.libvirt_uri), stdin=xml.encode(), vm=name)
        made.defined = name

    async def _finish(self, caller: Caller, target: AgentCredentials, name: str, autostart: bool, start: bool,
                      made: _Made, steps: _Steps) -> None:
        uri = target.agent.libvirt_uri
        if autostart:
            steps.tell("enabling autostart")
            await self._step(caller, target, virsh.autostart_command(uri, name, True), vm=name)
        if start:
            steps.tell("starting the VM")
            await self._step(caller, target, virsh.action_command(uri, name, virsh.VmAction.START), vm=name)
            made.started = True

    async def _created(self, caller: Caller, target: AgentCredentials, name: str, made: _Made, started: bool,
                       wait: int | None, progress: Progress | None, abandoned: asyncio.Event | None) -> CreatedVm:
        state = waited = None
        if started and wait is not None:
            state, waited = await self.vms.wait_for_state(caller, target, name, "running", wait, progress, abandoned)
        result = await self.remote.run(caller, target, virsh.dominfo_command(target.agent.libvirt_uri, name))
        virsh.raise_for_failure(result, name)
        info = VmInfo(dominfo=await parse_output(virsh.parse_dominfo, result.stdout), raw=result)
        return CreatedVm(info=info, volumes=list(made.volumes), state=state, waited_seconds=waited)

    # ------------------------------------------------------------------ clone

    async def clone_vm(self, caller: Caller, agent_id: int, vm: str, request: CloneRequest, *,
                       progress: Progress | None = None) -> CreatedVm:
        """Clone a shut-off VM: each disk (a pool volume) copied with ``vol-clone`` into a volume
        named after the clone, the XML rewritten (new name, no UUID nor MAC addresses: libvirt
        makes new ones; CD-ROMs emptied, a cloud-init seed belongs to its VM) and defined.
        Audited as ``vm.clone`` on the source VM; a failure midway removes what it made."""
        steps = _Steps(progress)
        made = _Made()
        target: AgentCredentials | None = None
        try:
            virsh.require_vm_name(vm)
            errors = collect(("name", virsh.check_vm_name(request.name)),
                             ("name", None if len(request.name) + 12 <= virsh.VM_NAME_MAX else "is too long"))
            if errors:
                raise ValidationFailed(errors)
            target = await self.remote.target(caller, agent_id)
            uri = target.agent.libvirt_uri
            source_xml, state, existing = await self._each(caller, target, [
                virsh.domain_xml_command(uri, vm), virsh.state_command(uri, vm),
                virsh.dominfo_command(uri, request.name)])
            virsh.raise_for_failure(source_xml, vm)
            virsh.raise_for_failure(state, vm)
            if virsh.parse_state(state.stdout) != "shut off":
                raise VmRunning(f"VM {vm!r} must be shut off to be cloned")
            if existing.exit_status == 0:
                raise VmNameTaken(f"this agent already has a VM named {request.name!r}")
            devices = virsh.parse_domain_xml(source_xml.stdout)
            located = await self._locate(caller, target, [d for d in devices.disks if d.device == "disk"], vm)
        except PortalError as error:
            await self._audit(caller, "vm.clone", agent_id, vm, error.code, error.detail)
            raise
        try:
            specs: dict[str, DiskSpec] = {}
            for index, (device, pool, volume) in enumerate(located):
                fmt = volume.format or "raw"
                new = CreatedVolume(pool=pool, name=f"{request.name}{'' if index == 0 else '-' + str(device.target)}"
                                                    f".{'qcow2' if fmt == 'qcow2' else 'img'}",
                                    format=fmt, capacity_bytes=volume.capacity_bytes or 0)
                steps.tell(f"copying {pool}/{volume.name}")
                await self._step(caller, target, virsh.volume_clone_command(uri, pool, volume.name, new.name),
                                 pool=pool, volume=new.name)
                made.volumes.append(new)
                specs[str(device.target)] = DiskSpec(pool, new.name, fmt)
            try:
                xml = domains.clone_xml(source_xml.stdout, request.name, specs)
            except (ValueError, SyntaxError) as error:
                raise ValidationFailed.one("vm", f"the VM's XML cannot be read: {error}") from None
            await self._define(caller, target, xml, request.name, made, steps)
            await self._finish(caller, target, request.name, False, request.start, made, steps)
        except BaseException as error:
            await self._undo_and_audit(caller, "vm.clone", agent_id, target, vm, made, error)
            raise
        await self._audit(caller, "vm.clone", agent_id, vm, "ok",
                          f"clone {request.name}; {made.describe(request.start)}")
        return await self._created(caller, target, request.name, made, False, None, None, None)

    async def _locate(self, caller: Caller, target: AgentCredentials, disks: Iterable[virsh.DiskDevice],
                      vm: str) -> list[tuple[virsh.DiskDevice, str, Volume]]:
        """Each disk as a volume of a pool (its pool, its volume), or ``VolumeNotFound``."""
        by_path, by_name = await self._pool_volumes(caller, target)
        located = []
        for disk in disks:
            found = by_name.get((disk.pool, disk.volume)) if disk.volume else by_path.get(disk.file or "")
            if found is None:
                raise VolumeNotFound(f"disk {disk.target} of VM {vm!r} is not a volume of a storage pool "
                                     f"({disk.file or disk.volume}); the portal copies only pool volumes")
            located.append((disk, found[0], found[1]))
        return located

    async def _pool_volumes(self, caller: Caller, target: AgentCredentials) -> tuple[
            dict[str, tuple[str, Volume]], dict[tuple[str | None, str | None], tuple[str, Volume]]]:
        """Every volume of every active pool, by path and by (pool, name)."""
        by_path: dict[str, tuple[str, Volume]] = {}
        by_name: dict[tuple[str | None, str | None], tuple[str, Volume]] = {}
        for pool in await self.list_pools(caller, target.agent.id):
            if pool.state != "running":
                continue
            for volume in await self._volumes(caller, target, pool.name):
                if volume.path:
                    by_path[volume.path] = (pool.name, volume)
                by_name[(pool.name, volume.name)] = (pool.name, volume)
        return by_path, by_name

    # ------------------------------------------------------------------ delete

    async def delete_vm(self, caller: Caller, agent_id: int, vm: str, *, force: bool = False,
                        remove_storage: bool = False) -> None:
        """Undefine a VM with its snapshots' metadata (and UEFI variables file). A running VM is
        refused (``vm_running``) unless ``force`` (destroyed first). ``remove_storage`` also
        deletes the pool volumes its disks use, refused (``volume_in_use``, before anything is
        changed) when another defined VM uses one of them, as a disk or as the backing file of one
        of its disks. Audited as ``vm.delete``."""
        detail = []
        try:
            virsh.require_vm_name(vm)
            target = await self.remote.target(caller, agent_id)
            uri = target.agent.libvirt_uri
            xml, state = await self._each(caller, target, [virsh.domain_xml_command(uri, vm),
                                                           virsh.state_command(uri, vm)])
            virsh.raise_for_failure(xml, vm)
            virsh.raise_for_failure(state, vm)
            running = virsh.parse_state(state.stdout) not in ("shut off", None)
            if running and not force:
                raise VmRunning(f"VM {vm!r} is {virsh.parse_state(state.stdout)}; shut it off first, or delete with "
                                "force=true")
            devices = virsh.parse_domain_xml(xml.stdout)
            doomed: list[tuple[str, Volume]] = []
            if remove_storage:
                disks = [d for d in devices.disks if d.volume or d.file]
                doomed = await self._removable(caller, target, vm, disks)
            if running:
                result = await self.remote.run(caller, target, virsh.action_command(uri, vm, virsh.VmAction.FORCE_STOP))
                with contextlib.suppress(VmNotRunning):  # it stopped meanwhile
                    virsh.raise_for_failure(result, vm)
                detail.append("destroyed")
            await self._step(caller, target, virsh.undefine_command(uri, vm, devices.nvram), vm=vm)
            detail.append("undefined")
            failed = []
            for pool, volume in doomed:
                result = await self.remote.run(caller, target, virsh.volume_delete_command(uri, pool, volume.name))
                if result.exit_status == 0:
                    detail.append(f"removed {pool}/{volume.name}")
                else:
                    failed.append(f"{pool}/{volume.name} ({result.stderr.strip()[:200]})")
            if failed:
                detail.append("could not remove " + ", ".join(failed))
                raise VirshFailed(f"VM {vm!r} was undefined but some of its volumes could not be removed: "
                                  + ", ".join(failed))
        except PortalError as error:
            await self._audit(caller, "vm.delete", agent_id, vm, error.code,
                              "; ".join([error.detail, *detail]) if detail else error.detail)
            raise
        await self._audit(caller, "vm.delete", agent_id, vm, "ok", "; ".join(detail))

    async def _removable(self, caller: Caller, target: AgentCredentials, vm: str,
                         disks: list[virsh.DiskDevice]) -> list[tuple[str, Volume]]:
        """The pool volumes of ``disks``, or ``VolumeInUse`` if another defined VM uses one."""
        by_path, by_name = await self._pool_volumes(caller, target)
        doomed: list[tuple[str, Volume]] = []
        for disk in disks:
            found = by_name.get((disk.pool, disk.volume)) if disk.volume else by_path.get(disk.file or "")
            if found is not None and found not in doomed:
                doomed.append(found)
        if not doomed:
            return []
        uri = target.agent.libvirt_uri
        listed = await self._run(caller, target, virsh.list_command(uri))
        others = [d.name for d in await parse_output(virsh.parse_list, listed.stdout)
                  if d.name != vm and virsh.check_vm_name(d.name) is None]
        xmls = await self._each(caller, target, [virsh.domain_xml_command(uri, other) for other in others])
        used: dict[str, str] = {}  # path -> the VM that uses it
        for other, result in zip(others, xmls, strict=True):
            if result.exit_status != 0:
                continue  # undefined meanwhile
            for disk in virsh.parse_domain_xml(result.stdout).disks:
                found = by_name.get((disk.pool, disk.volume)) if disk.volume else by_path.get(disk.file or "")
                path = found[1].path if found is not None else disk.file
                # the whole backing chain of the disk is in use too (e.g. a base image)
                for _ in range(16):
                    if not path or path in used:
                        break
                    used[path] = other
                    entry = by_path.get(path)
                    path = entry[1].backing_path if entry is not None else None
        for pool, volume in doomed:
            if volume.path in used:
                raise VolumeInUse(f"volume {pool}/{volume.name} is used by VM {used[volume.path]!r}; nothing was "
                                  "changed (delete without remove_storage to keep the volumes)")
        return doomed

    # ------------------------------------------------------------------ addresses

    async def interfaces(self, caller: Caller, agent_id: int, vm: str, source: str | None = None) -> list[
            GuestInterface]:
        """The guest's network interfaces and addresses (``virsh domifaddr``): from ``source``
        (``agent``: the qemu guest agent; ``lease``: the libvirt network's DHCP leases; ``arp``:
        the host's ARP table), or by default the guest agent, then the leases. Each interface
        names its libvirt network (or bridge) from the VM's XML."""
        virsh.require_vm_name(vm)
        if source is not None and source not in virsh.INTERFACE_SOURCES:
            raise ValidationFailed.one("source", "must be one of " + ", ".join(virsh.INTERFACE_SOURCES))
        target = await self.remote.target(caller, agent_id)
        uri = target.agent.libvirt_uri
        sources = [source] if source is not None else ["agent", "lease"]
        xml = await self.remote.run(caller, target, virsh.domain_xml_command(uri, vm, inactive=False))
        virsh.raise_for_failure(xml, vm)
        found: list[GuestInterface] = []
        for index, each in enumerate(sources):
            result = await self.remote.run(caller, target, virsh.interfaces_command(uri, vm, each))
            if result.exit_status == 0:
                found = await parse_output(virsh.parse_domifaddr, result.stdout)
                break
            try:
                virsh.raise_for_failure(result, vm)
            except (VmNotFound, VmNotRunning):
                raise
            except PortalError:
                if index == len(sources) - 1:
                    raise
        devices = virsh.parse_domain_xml(xml.stdout)
        by_mac = {(d.mac or "").lower(): d for d in devices.interfaces}
        answered = []
        seen = set()
        for interface in found:
            device = by_mac.get((interface.mac or "").lower())
            seen.add((interface.mac or "").lower())
            answered.append(GuestInterface(name=interface.name, mac=interface.mac,
                                           network=None if device is None else device.network or device.bridge,
                                           addresses=interface.addresses))
        for device in devices.interfaces:  # interfaces without an address yet
            if (device.mac or "").lower() not in seen:
                answered.append(GuestInterface(name=device.target or "-", mac=device.mac,
                                               network=device.network or device.bridge, addresses=[]))
        return answered

    # ------------------------------------------------------------------ helpers

    async def _run(self, caller: Caller, target: AgentCredentials, argv: tuple[str, ...]) -> CommandResult:
        result = await self.remote.run(caller, target, argv)
        virsh.raise_for_failure(result)
        return result

    async def _each(self, caller: Caller, target: AgentCredentials,
                    argvs: list[tuple[str, ...]]) -> list[CommandResult]:
        """Run every argv, a few at a time (the host's sshd allows 10 channels per connection)."""
        gate = asyncio.Semaphore(VOLUME_PARALLELISM)

        async def one(argv: tuple[str, ...]) -> CommandResult:
            async with gate:
                return await self.remote.run(caller, target, argv)

        return list(await asyncio.gather(*(one(argv) for argv in argvs)))

    async def _step(self, caller: Caller, target: AgentCredentials, argv: tuple[str, ...], *,
                    stdin: bytes | None = None, vm: str | None = None, pool: str | None = None,
                    volume: str | None = None) -> CommandResult:
        result = await self.remote.run(caller, target, argv, stdin=stdin)
        virsh.raise_for_provisioning_failure(result, vm=vm, pool=pool, volume=volume)
        return result

    async def _undo_and_audit(self, caller: Caller, action: str, agent_id: int, target: AgentCredentials | None,
                              vm: str, made: _Made, error: BaseException) -> None:
        """Undo what ``made`` holds, in reverse; audit the failure and what was undone."""
        undone: list[str] = []
        left: list[str] = []
        if target is not None:
            await self._undo(caller, target, made, undone, left)
        code = error.code if isinstance(error, PortalError) else \
            "cancelled" if isinstance(error, asyncio.CancelledError) else "internal_error"
        reason = error.detail if isinstance(error, PortalError) else type(error).__name__
        parts = [reason]
        if undone:
            parts.append("removed " + ", ".join(undone))
        if left:
            parts.append("COULD NOT REMOVE " + ", ".join(left))
            if isinstance(error, PortalError):
                error.detail = f"{error.detail}; left on the host: {', '.join(left)}"
        await self._audit(caller, action, agent_id, vm, code, "; ".join(parts))

    async def _undo(self, caller: Caller, target: AgentCredentials, made: _Made, undone: list[str],
                    left: list[str]) -> None:
        uri = target.agent.libvirt_uri
        steps: list[tuple[str, tuple[str, ...]]] = []
        if made.defined is not None:
            if made.started:
                steps.append((f"VM {made.defined} (destroyed)",
                              virsh.action_command(uri, made.defined, virsh.VmAction.FORCE_STOP)))
            steps.append((f"VM {made.defined}", virsh.undefine_command(uri, made.defined, False)))
        steps += [(f"{v.pool}/{v.name}", virsh.volume_delete_command(uri, v.pool, v.name))
                  for v in reversed(made.volumes)]
        for label, argv in steps:
            try:
                result = await self.remote.run(caller, target, argv)
            except PortalError as failure:  # the host is gone: say what is left
                left.append(f"{label} ({failure.code})")
                continue
            if result.exit_status == 0 or "destroyed" in label:
                undone.append(label)
            else:
                left.append(f"{label} ({result.stderr.strip()[:200] or result.exit_status})")

    async def _audit(self, caller: Caller, action: str, agent_id: int, vm: str, outcome: str,
                     detail: str | None) -> None:
        await asyncio.to_thread(self.remote.audit.record, caller, action, agent_id, vm, outcome, detail)


class _Made:
    """What a provisioning request has made on the host so far (undone in reverse on failure)."""

    def __init__(self) -> None:
        self.volumes: list[CreatedVolume] = []
        self.defined: str | None = None
        self.started = False

    def describe(self, start: bool) -> str:
        volumes = ", ".join(f"{v.pool}/{v.name}" for v in self.volumes) or "no volumes"
        return f"created {volumes}; defined{' and started' if start else ''}"


class _Steps:
    """Tells ``progress`` (the command line's stderr) which step runs, with the seconds so far."""

    def __init__(self, progress: Progress | None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._progress = progress
        self._clock = monotonic
        self._started = self._clock()

    def tell(self, step: str) -> None:
        if self._progress is not None:
            self._progress(step, self._clock() - self._started)

