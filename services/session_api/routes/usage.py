"""The tenant's own view, for metering: seconds and blocks generated today (UTC) against its quotas.
(Tenants and keys are created by operators with ``liveavatar tenants create``; the API has no admin
routes.)"""

from __future__ import annotations

import time

from fastapi import APIRouter

from services.session_api.deps import StateDep, TenantDep
from services.session_api.schemas import UsageOut
from services.session_api.tenants import active_sessions

router = APIRouter(tags=["tenant"])


def _usage(st, tenant) -> UsageOut:
    day = time.strftime("%Y%m%d", time.gmtime())
    return UsageOut(tenant=tenant.tenant_id, day=day, seconds_generated_today=st.store.get_usage(tenant.tenant_id, day),
                    blocks_generated_today=st.store.get_usage_blocks(tenant.tenant_id, day),
                    minutes_per_day=tenant.minutes_per_day, active_sessions=active_sessions(st.store, tenant.tenant_id),
                    max_sessions=tenant.max_sessions)


@router.get("/v1/usage", response_model=UsageOut)
async def usage(st: StateDep, tenant: TenantDep):
    return await st.io(_usage, st, tenant)
