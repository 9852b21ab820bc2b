"""Who a caller is: a user of an organization, with roles (usher.auth finds out)."""

from __future__ import annotations

from dataclasses import dataclass, field

from usher.errors import PermissionDenied
from usher.keys import tenant_id

__all__ = ["ADMIN_ROLE", "Principal"]

ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    organization: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def tenant(self) -> str:
        """The "org/user" identity that owns requests and fairness flows (keys.tenant_id)."""
        return tenant_id(self.organization, self.user)

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    def require_admin(self) -> None:
        if not self.is_admin:
            raise PermissionDenied("this method needs the admin role")
