-- A delivered mail keeps who it went to, what it was about and when; its text (temporary
-- passwords, activation links) is dropped on delivery. Mails delivered before this
-- migration lose their text now.
ALTER TABLE mail_queue ADD COLUMN subject TEXT;
UPDATE mail_queue SET message = '' WHERE sent_at IS NOT NULL;
