-- A change to what an endpoint's claimed deliveries were taken with (its URL, its keys, its
-- status), or its deletion, tells the senders (on the webhook_delivery channel, payload
-- "endpoint <id>"): each process gives back what it claimed for that endpoint and has not sent
-- yet, and its next claim takes the endpoint as it is now, or not at all. Before, a process went
-- on sending what it had claimed, to the old URL, with the old keys, or to a disabled or deleted
-- endpoint, for as long as its claims lasted (up to 8 WEBHOOK_TIMEOUTs behind a slow endpoint).
-- Changes by hand in psql count the same.
CREATE FUNCTION notify_webhook_endpoint_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('webhook_delivery', 'endpoint ' || OLD.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER webhook_endpoints_changed
    AFTER UPDATE ON webhook_endpoints
    FOR EACH ROW
    WHEN (OLD.url IS DISTINCT FROM NEW.url
          OR OLD.status IS DISTINCT FROM NEW.status
          OR OLD.secret IS DISTINCT FROM NEW.secret
          OR OLD.previous_secret IS DISTINCT FROM NEW.previous_secret
          OR OLD.previous_secret_expires_at IS DISTINCT FROM NEW.previous_secret_expires_at)
    EXECUTE FUNCTION notify_webhook_endpoint_changed();

CREATE TRIGGER webhook_endpoints_deleted
    AFTER DELETE ON webhook_endpoints
    FOR EACH ROW
    EXECUTE FUNCTION notify_webhook_endpoint_changed();
