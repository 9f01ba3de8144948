-- One spelling per identity (issue #13): device serials are stored upper case and unique
-- whatever their case; company names are stored trimmed and unique whatever their case (the
-- first spelling stays). Devices or companies that differ only in case (or spaces) cannot be
-- merged by a migration: it stops and names them.
DO $$
DECLARE
    clash TEXT;
BEGIN
    SELECT string_agg(serial, ', ' ORDER BY serial) INTO clash FROM devices
        WHERE UPPER(serial) IN (SELECT UPPER(serial) FROM devices GROUP BY 1 HAVING COUNT(*) > 1);
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION 'registered devices whose serials differ only in case: %; remove or rename one of each before upgrading', clash;
    END IF;
    SELECT string_agg(quote_literal(name), ', ' ORDER BY name) INTO clash FROM companies
        WHERE LOWER(TRIM(name)) IN (SELECT LOWER(TRIM(name)) FROM companies GROUP BY 1 HAVING COUNT(*) > 1);
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION 'companies whose names differ only in case or surrounding spaces: %; rename one of each before upgrading', clash;
    END IF;
END
$$;

-- certificates.device_serial references devices.serial: both change together.
ALTER TABLE certificates DROP CONSTRAINT certificates_device_serial_fkey;

-- Rows keyed by a serial that a registered device is about to take (refusals of a
-- certificate that named it in the other case) give way to the device's own.
DELETE FROM device_status WHERE serial = UPPER(serial)
    AND serial IN (SELECT UPPER(serial) FROM devices WHERE serial <> UPPER(serial));
DELETE FROM device_info WHERE serial = UPPER(serial)
    AND serial IN (SELECT UPPER(serial) FROM devices WHERE serial <> UPPER(serial));
DELETE FROM locations WHERE serial = UPPER(serial)
    AND serial IN (SELECT UPPER(serial) FROM devices WHERE serial <> UPPER(serial));

UPDATE devices SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE certificates SET device_serial = UPPER(device_serial) WHERE device_serial <> UPPER(device_serial);
UPDATE device_status SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE device_info SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE locations SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE connect_refusals SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE telemetry SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE device_sessions SET serial = UPPER(serial) WHERE serial <> UPPER(serial);
UPDATE quarantine SET serial = UPPER(serial) WHERE serial <> UPPER(serial);

ALTER TABLE certificates ADD CONSTRAINT certificates_device_serial_fkey
    FOREIGN KEY (device_serial) REFERENCES devices(serial);

UPDATE companies SET name = TRIM(name) WHERE name <> TRIM(name);

CREATE UNIQUE INDEX devices_serial_folded ON devices (UPPER(serial));
CREATE UNIQUE INDEX companies_name_folded ON companies (LOWER(name));
