"""A VM's libvirt internal snapshots: list, take, revert to, delete. Asynchronous (SSH)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import attrs

from core import virsh
from core.commands import NewSnapshot
from core.errors import SnapshotNotFound
from core.model import AgentCredentials, Caller
from core.ports import CommandResult
from core.remote import RemoteCommands, parse_output
from core.virsh import Snapshot


class SnapshotService:
    """Internal (qcow2) snapshots of the VMs on the caller's agents."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, remote: RemoteCommands) -> None:
        self.remote = remote

    async def list_snapshots(self, caller: Caller, agent_id: int, vm: str) -> list[Snapshot]:
        """The VM's snapshots (``virsh snapshot-list --parent``), the current one marked."""
        virsh.require_vm_name(vm)
        target = await self.remote.target(caller, agent_id)
        return await self._snapshots(caller, target, vm)

    async def get_snapshot(self, caller: Caller, agent_id: int, vm: str, snapshot: str) -> Snapshot:
        """One snapshot as the list shows it (where the 201 of ``create_snapshot`` points)."""
        virsh.require_vm_name(vm)
        virsh.require_snapshot_name(snapshot)
        target = await self.remote.target(caller, agent_id)
        return self._named(await self._snapshots(caller, target, vm), vm, snapshot)

    @staticmethod
    def _named(snapshots: list[Snapshot], vm: str, snapshot: str) -> Snapshot:
        for found in snapshots:
            if found.name == snapshot:
                return found
        raise SnapshotNotFound(f"VM {vm!r} has no snapshot named {snapshot!r}")

    async def _snapshots(self, caller: Caller, target: AgentCredentials, vm: str) -> list[Snapshot]:
        uri = target.agent.libvirt_uri
        listed, current = await asyncio.gather(
            self.remote.run(caller, target, virsh.snapshot_list_command(uri, vm)),
            self.remote.run(caller, target, virsh.snapshot_current_command(uri, vm)),
        )
        virsh.raise_for_snapshot_failure(listed, vm)
        current_name = virsh.parse_current_snapshot(current)
        listed_snapshots = await parse_output(virsh.parse_snapshot_list, listed.stdout)
        return [attrs.evolve(s, current=s.name == current_name) for s in listed_snapshots]

    async def create_snapshot(self, caller: Caller, agent_id: int, vm: str, request: NewSnapshot) -> Snapshot:
        """Take an internal snapshot (``virsh snapshot-create-as``); audited as
        ``vm.snapshot_create``. Answers the snapshot as the list shows it afterwards."""
        _, target = await self.remote.audited(
            caller, "vm.snapshot_create", agent_id, vm,
            lambda uri: virsh.snapshot_create_command(uri, vm, request.name, request.description),
            f"snapshot {request.name}", snapshot=request.name)
        # (not found: deleted again in between by someone else)
        return self._named(await self._snapshots(caller, target, vm), vm, request.name)

    async def revert_snapshot(self, caller: Caller, agent_id: int, vm: str, snapshot: str) -> CommandResult:
        """Revert the VM to a snapshot (``virsh snapshot-revert``); audited as ``vm.snapshot_revert``."""
        result, _ = await self.remote.audited(caller, "vm.snapshot_revert", agent_id, vm,
                                              lambda uri: virsh.snapshot_revert_command(uri, vm, snapshot),
                                              f"snapshot {snapshot}", snapshot=snapshot)
        return result

    async def delete_snapshot(self, caller: Caller, agent_id: int, vm: str, snapshot: str) -> CommandResult:
        """Delete a snapshot (``virsh snapshot-delete``; its children are kept, re-parented); audited
        as ``vm.snapshot_delete``."""
        result, _ = await self.remote.audited(caller, "vm.snapshot_delete", agent_id, vm,
                                              lambda uri: virsh.snapshot_delete_command(uri, vm, snapshot),
                                              f"snapshot {snapshot}", snapshot=snapshot)
        return result
