-- One spelling per identity (issue #13): device serials are stored upper case and unique
-- whatever their case; company names are stored trimmed and unique whatever their case (the
-- first spelling stays). Devices or companies that differ only in case (or spaces) cannot be
-- merged by a migration: it stops, and names the query that lists them.
CREATE TEMP TABLE one_spelling_check (what TEXT NOT NULL);
CREATE TEMP TRIGGER one_spelling_devices BEFORE INSERT ON one_spelling_check
WHEN NEW.what = 'devices' BEGIN
    SELECT RAISE(ABORT, 'two registered devices have serials that differ only in case; list them with SELECT UPPER(serial) FROM devices GROUP BY 1 HAVING COUNT(*) > 1, and remove or rename one of each before upgrading');
END;
CREATE TEMP TRIGGER one_spelling_companies BEFORE INSERT ON one_spelling_check
WHEN NEW.what = 'companies' BEGIN
    SELECT RAISE(ABORT, 'two companies have names that differ only in case or surrounding spaces; list them with SELECT LOWER(TRIM(name)) FROM companies GROUP BY 1 HAVING COUNT(*) > 1, and rename one of each before upgrading');
END;
INSERT INTO one_spelling_check (what)
    SELECT 'devices' WHERE EXISTS (SELECT 1 FROM devices GROUP BY UPPER(serial) HAVING COUNT(*) > 1);
INSERT INTO one_spelling_check (what)
    SELECT 'companies' WHERE EXISTS (SELECT 1 FROM companies GROUP BY LOWER(TRIM(name)) HAVING COUNT(*) > 1);
DROP TABLE one_spelling_check;

-- certificates.device_serial references devices.serial: both change in this transaction.
PRAGMA defer_foreign_keys = ON;

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

UPDATE companies SET name = TRIM(name) WHERE name <> TRIM(name);

CREATE UNIQUE INDEX devices_serial_folded ON devices (UPPER(serial));
CREATE UNIQUE INDEX companies_name_folded ON companies (LOWER(name));
