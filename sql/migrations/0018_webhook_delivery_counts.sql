-- An endpoint's deliveries kept, by status: what every answer carrying an endpoint shows (GET,
-- the list, PATCH, rotate-secret). One definition for the queries that count them; a SQL function
-- of one SELECT, inlined where it is called (an index-only count per endpoint).
CREATE FUNCTION webhook_delivery_counts(counted_endpoint_id bigint)
RETURNS TABLE (pending bigint, delivered bigint, failed bigint)
LANGUAGE sql STABLE AS $$
    SELECT count(*) FILTER (WHERE d.status = 'pending'),
           count(*) FILTER (WHERE d.status = 'delivered'),
           count(*) FILTER (WHERE d.status = 'failed')
    FROM webhook_deliveries AS d WHERE d.endpoint_id = counted_endpoint_id
$$;
