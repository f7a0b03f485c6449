"""The admin API for clusters: their nodes' health, and nodes added, drained, removed.

    GET    /admin/clusters                        every cluster, its nodes and their health,
                                                  and its discovery sources' state
    POST   /admin/clusters/NAME/nodes             {"uri": ..., "weight": 1, "keep": false}
    POST   /admin/clusters/NAME/nodes/drain       {"uri": ..., "keep": false}
    DELETE /admin/clusters/NAME/nodes?uri=URI     (or the same JSON body; "keep" too)

A change reaches every worker before the answer, which says whether all have
it ("complete"). A new node takes traffic at once, through slow start when
the cluster has a health table. A drained node takes no new request; those in
flight finish, then its connections close. What ``keep`` means across
reloads: see pitcher_rpc.config.overlay.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..config.overlay import NodeChange, OverlayError
from .admin import AdminError, AdminRequest, AdminResponse, AdminServer

if TYPE_CHECKING:
    from .master import Master


def install(admin: AdminServer, master: Master) -> None:
    async def clusters(request: AdminRequest) -> AdminResponse:
        config = master.config
        health = master.coordination.health.describe(time.monotonic())
        draining = master.overlay.draining(config)
        found = master.feed.describe()
        return AdminResponse(
            200,
            {
                "clusters": {
                    name: {
                        "balance": cluster.balance,
                        "nodes": [{"uri": n.uri, "weight": n.weight} for n in cluster.nodes],
                        "draining": draining.get(name, []),
                        "health": health.get(name),
                        **({"discovery": found[name]} if name in found else {}),
                    }
                    for name, cluster in config.clusters.items()
                },
                "changes": master.overlay.changes_json(),
            },
        )

    async def change(request: AdminRequest, action: str) -> AdminResponse:
        fields = _fields(request, action)
        try:
            result = await master.change_nodes(
                NodeChange(
                    action,
                    request.params["name"],
                    fields["uri"],
                    fields.get("weight", 1),
                    fields.get("keep", False),
                )
            )
        except OverlayError as exc:
            raise AdminError(exc.status, str(exc)) from None
        status = (201 if action == "add" else 200) if result["complete"] else 500
        return AdminResponse(status, result)

    async def add(request: AdminRequest) -> AdminResponse:
        return await change(request, "add")

    async def drain(request: AdminRequest) -> AdminResponse:
        return await change(request, "drain")

    async def remove(request: AdminRequest) -> AdminResponse:
        return await change(request, "remove")

    admin.route("GET", "/admin/clusters", clusters, "every cluster, its nodes and their health")
    admin.route("POST", "/admin/clusters/{name}/nodes", add, 'add a node: {"uri", "weight"}')
    admin.route("POST", "/admin/clusters/{name}/nodes/drain", drain, 'drain a node: {"uri"}')
    admin.route("DELETE", "/admin/clusters/{name}/nodes", remove, "remove a node: ?uri=URI")


def _fields(request: AdminRequest, action: str) -> dict[str, Any]:
    """uri, weight and keep from the JSON body (or the query), checked."""
    fields: dict[str, Any] = {}
    if request.body.strip():
        body = request.json()
        if not isinstance(body, dict):
            raise AdminError(400, 'the body must be a JSON object like {"uri": "tcp://..."}')
        fields.update(body)
    for key in ("uri", "weight", "keep"):
        if key in request.query and key not in fields:
            value: Any = request.query[key]
            if key == "weight":
                value = int(value) if value.isdigit() else value
            elif key == "keep":
                value = value.lower() in ("", "1", "true", "yes")
            fields[key] = value
    allowed = {"uri", "keep"} | ({"weight"} if action == "add" else set())
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise AdminError(
            400, f"unknown field {unknown[0]!r} (expected {', '.join(sorted(allowed))})"
        )
    uri = fields.get("uri")
    if not isinstance(uri, str) or not uri:
        raise AdminError(400, "uri is required: the node's address, e.g. tcp://127.0.0.1:7001")
    weight = fields.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise AdminError(400, f"weight must be a whole number, got {weight!r}")
    if not isinstance(fields.get("keep", False), bool):
        raise AdminError(400, f"keep must be true or false, got {fields['keep']!r}")
    return fields
