-- Updates a deployment has not sent yet (pending, no command): what a server that crashed while
-- sending finds and sends at its next start (`unsent_updates`). Only those rows are indexed.
CREATE INDEX ota_device_updates_unsent ON ota_device_updates (deployment_id, device_id)
    WHERE command_id IS NULL AND state = 'pending';
