"""The model watch actor: reads the configured models from the API's catalogue once a day.

Receives and sends nothing. Every day (every hour while the catalogue cannot be read) it
reads each configured model again (`openai_models.check_and_report`): a shutdown date
announced since startup is logged as a WARNING, a model that has shut down as an ERROR,
and `/status` (`models`) and the gauge `dynamo_model_shutdown_days` follow. The startup
check is the service's (a production refusal must stop startup); this actor starts after
it. Persists nothing; on restart it waits a full period again, the last findings kept in
the `ModelsStatus` it is given. On cancellation it just stops.
"""

from __future__ import annotations

import trio

from dynamo.openai_port.catalogue import ModelsStatus, check_and_report


async def run(
    *, generator, models: ModelsStatus, profile: str, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    if models.offline:
        return
    while True:
        await trio.sleep(models.next_check_in_s())
        await check_and_report(generator, models, profile=profile, at_startup=False)
