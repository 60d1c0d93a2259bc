-- Updates sent to a device that has not reported on them (pending, with a command, no seq): the
-- OTA sweeper looks here for those whose command ended without success (`ended_update_commands`)
-- in case the server stopped between storing the command's end and failing its update. Only
-- those rows are indexed.
CREATE INDEX ota_device_updates_unanswered ON ota_device_updates (deployment_id, device_id)
    WHERE command_id IS NOT NULL AND seq IS NULL AND state = 'pending';
