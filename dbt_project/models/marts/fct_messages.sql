-- One row per outbox row: every recipient of every campaign, with the final status of the
-- message (or why it was not sent), its cost, and what followed it.
--
-- Incremental: a refresh recomputes only the messages that what this build loaded could
-- have changed (see `changed_messages` below); everything else is kept. The result is the
-- same as a full refresh: tests/test_marts.py builds both and compares them row by row.

{{
    config(
        materialized='incremental',
        unique_key='message_id',
        incremental_strategy='delete+insert',
        on_schema_change='append_new_columns',
        post_hook=[
            "{% if is_incremental() %}delete from {{ this }} where message_id not in (select message_id from {{ ref('stg_ops__messages') }}){% endif %}",
        ],
    )
}}

-- refs inside the incremental branch, declared for the DAG:
-- depends_on: {{ ref('stg_ops__message_status_events') }}
-- depends_on: {{ ref('int_clicks_classified') }}
-- depends_on: {{ ref('stg_ops__inbound_messages') }}
-- depends_on: {{ ref('stg_ops__orders') }}
-- depends_on: {{ ref('stg_ops__consent_events') }}

{#- A table from before a column was added is recomputed whole, so no row keeps a gap. -#}
{%- set refresh_all = true -%}
{%- if is_incremental() -%}
    {%- set existing = adapter.get_columns_in_relation(this) | map(attribute='name') | map('lower') | list -%}
    {%- set missing = model.columns.keys() | map('lower') | reject('in', existing) | list -%}
    {%- set refresh_all = missing | length > 0 -%}
{%- endif %}

{#-
    What this build loaded. `smsops build` loads the ops tables before dbt starts
    (smsops/dbt_plugin.py, `sync`) and records in ops._loads, per table, the key its new rows
    lie above (`loaded_above`). When every table below was loaded that way, the new facts are
    exactly the rows above those keys, whatever their timestamps, and only the messages they
    can change are recomputed. Otherwise (plain `dbt build`, which reads the tables whole; a
    first load; an erasure, deleted rows or another store, which load a table whole) the
    refresh falls back to the timestamp rule: everything recorded after the latest activity
    the previous build saw, less var('incremental_lookback_hours').
-#}
{%- set loaded_above = {} -%}
{%- if not refresh_all and execute and env_var('SMSOPS_OPS_PRELOADED', '') -%}
    {%- set loads = adapter.get_relation(database=this.database, schema='ops', identifier='_loads') -%}
    {%- if loads is not none -%}
        {%- set keyed = ['messages', 'message_status_events', 'clicks', 'inbound_messages', 'orders', 'consent_events'] -%}
        {%- set recorded = run_query(
            "select table_name, loaded_above from " ~ loads
            ~ " where how <> 'full' and loaded_above is not null and table_name in ('"
            ~ keyed | join("', '") ~ "')"
        ) -%}
        {%- for row in recorded.rows -%}
            {%- do loaded_above.update({row[0]: row[1] | int}) -%}
        {%- endfor -%}
        {%- if loaded_above | length != keyed | length -%}
            {%- set loaded_above = {} -%}
        {%- endif -%}
    {%- endif -%}
{%- endif -%}
{%- set by_load = loaded_above | length > 0 %}

with

messages as (

    select * from {{ ref('stg_ops__messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}

),

{% if not refresh_all %}

-- What could have changed since the previous build: the new facts (`new_*` below) mark the
-- messages they concern. A receipt, click or reply changes its own message; a delivery or a
-- click is also a touch, and a new order is a conversion to attribute, so either marks every
-- message of that contact (last touch can move between them); an opt-out marks the messages
-- to that number; an outbox row that differs from what was built marks itself, every message
-- of its contact (before and after) and those of a number it shares with an opt-out.
previous as (

    select * from {{ this }}

),

{% if not by_load %}
watermark as (

    select
        {{ dbt.dateadd(
            'hour',
            -1 * var('incremental_lookback_hours'),
            'least(greatest(max(planned_at), max(sent_at), max(final_status_at), max(first_clicked_at)), '
                ~ 'cast(' ~ dbt.current_timestamp() ~ ' as ' ~ dbt.type_timestamp() ~ '))'
        ) }} as refresh_from
    from previous

),
{% endif %}

status_events as (

    select * from {{ ref('stg_ops__message_status_events') }}

),

clicks as (

    select * from {{ ref('int_clicks_classified') }}

),

inbound as (

    select * from {{ ref('stg_ops__inbound_messages') }}

),

orders as (

    select * from {{ ref('stg_ops__orders') }}

),

consent_events as (

    select * from {{ ref('stg_ops__consent_events') }}

),

changed_outbox_rows as (

    select messages.message_id
    from messages
    inner join campaigns
        on messages.campaign_id = campaigns.campaign_id
    left join previous
        on messages.message_id = previous.message_id
    where previous.message_id is null
        or messages.outbox_state <> previous.outbox_state
        or messages.campaign_id <> previous.campaign_id
        or campaigns.campaign_kind is distinct from previous.campaign_kind
        or messages.contact_id <> previous.contact_id
        or messages.variant <> previous.variant
        or messages.phone_e164 is distinct from previous.phone_e164
        or messages.skip_reason is distinct from previous.skip_reason
        -- a receipt's error code outranks the send error: only a send error not shown counts
        or (messages.submit_error_code is not null and messages.submit_error_code is distinct from previous.error_code)
        or messages.encoding is distinct from previous.encoding
        or messages.segments is distinct from previous.segments
        or messages.currency is distinct from previous.currency
        or messages.provider is distinct from previous.provider
        or messages.attempts is distinct from previous.attempts
        or messages.planned_at is distinct from previous.planned_at
        or messages.not_before is distinct from previous.not_before
        or (case when messages.outbox_state = 'submitted' then messages.submitted_at end) is distinct from previous.sent_at
        or (case when messages.outbox_state = 'submitted' then messages.planned_price else 0 end)
            is distinct from previous.cost

),

new_status_events as (

    select status_events.message_id
    from status_events
    {% if by_load %}
    where status_events.status_event_id > {{ loaded_above['message_status_events'] }}
    {% else %}
    cross join watermark
    where status_events.received_at >= watermark.refresh_from
        or status_events.occurred_at >= watermark.refresh_from
    {% endif %}

),

new_clicks as (

    select clicks.message_id
    from clicks
    {% if by_load %}
    where clicks.click_id > {{ loaded_above['clicks'] }}
    {% else %}
    cross join watermark
    where clicks.clicked_at >= watermark.refresh_from
    {% endif %}

),

new_replies as (

    select inbound.in_reply_to_message_id as message_id
    from inbound
    {% if by_load %}
    where inbound.inbound_id > {{ loaded_above['inbound_messages'] }}
    {% else %}
    cross join watermark
    where inbound.received_at >= watermark.refresh_from
    {% endif %}
        and inbound.in_reply_to_message_id is not null

),

new_order_contacts as (

    select orders.contact_id
    from orders
    {% if by_load %}
    where orders.order_id > {{ loaded_above['orders'] }}
    {% else %}
    cross join watermark
    where orders.ordered_at >= watermark.refresh_from
    {% endif %}

),

new_opt_outs as (

    select
        consent_events.phone_e164,
        consent_events.occurred_at
    from consent_events
    {% if by_load %}
    where consent_events.consent_event_id > {{ loaded_above['consent_events'] }}
    {% else %}
    cross join watermark
    where (
            consent_events.recorded_at >= watermark.refresh_from
            or consent_events.occurred_at >= watermark.refresh_from
        )
    {% endif %}
        and consent_events.action = 'opt_out'

),

-- messages whose touches (delivery, clicks) or own row changed
touched_messages as (

    select message_id from changed_outbox_rows
    union
    select message_id from new_status_events
    union
    select message_id from new_clicks

),

touched_contacts as (

    select messages.contact_id
    from messages
    inner join touched_messages
        on messages.message_id = touched_messages.message_id

    union

    -- an outbox row that moved to another contact leaves the previous one's attribution
    select previous.contact_id
    from previous
    inner join changed_outbox_rows
        on previous.message_id = changed_outbox_rows.message_id

    union

    select contact_id from new_order_contacts

),

-- a changed outbox row (sent now, or another number) can take an opt-out from, or leave it
-- to, another message to the same number
changed_phones as (

    select messages.phone_e164
    from messages
    inner join changed_outbox_rows
        on messages.message_id = changed_outbox_rows.message_id

    union

    select previous.phone_e164
    from previous
    inner join changed_outbox_rows
        on previous.message_id = changed_outbox_rows.message_id

),

opted_out_phones as (

    select changed_phones.phone_e164
    from changed_phones
    where changed_phones.phone_e164 in (
        select consent_events.phone_e164 from consent_events where consent_events.action = 'opt_out'
    )

),

changed_messages as (

    select message_id from touched_messages

    union

    select message_id from new_replies

    union

    select messages.message_id
    from messages
    inner join touched_contacts
        on messages.contact_id = touched_contacts.contact_id

    union

    select messages.message_id
    from messages
    inner join opted_out_phones
        on messages.phone_e164 = opted_out_phones.phone_e164

    union

    -- an opt-out belongs to the latest message sent to that number within the window before it
    select messages.message_id
    from messages
    inner join new_opt_outs
        on messages.phone_e164 = new_opt_outs.phone_e164
        and new_opt_outs.occurred_at >= messages.submitted_at
        and new_opt_outs.occurred_at < {{ dbt.dateadd('hour', var('opt_out_window_hours'), 'messages.submitted_at') }}

),

{% endif %}

final_status as (

    select * from {{ ref('int_message_final_status') }}

),

clicks_per_message as (

    select * from {{ ref('int_message_clicks') }}

),

replies as (

    select * from {{ ref('int_message_replies') }}

),

conversions as (

    select * from {{ ref('int_message_conversions') }}

),

opt_outs as (

    select * from {{ ref('int_message_opt_outs') }}

),

final as (

    select
        messages.message_id,
        messages.campaign_id,
        campaigns.campaign_kind,
        messages.variant,
        messages.contact_id,
        messages.phone_e164,
        case
            when messages.outbox_state = 'submitted' then coalesce(final_status.final_status, 'queued')
            when messages.outbox_state = 'unknown' then 'sending'
            else messages.outbox_state
        end as status,
        messages.outbox_state,
        messages.outbox_state = 'holdout' as is_holdout,
        messages.skip_reason,
        coalesce(final_status.error_code, messages.submit_error_code) as error_code,
        messages.encoding,
        messages.segments,
        case when messages.outbox_state = 'submitted' then messages.planned_price else 0 end as cost,
        messages.currency,
        messages.provider,
        messages.attempts,
        messages.planned_at,
        messages.not_before,
        case when messages.outbox_state = 'submitted' then messages.submitted_at end as sent_at,
        final_status.delivered_at,
        final_status.final_status_at,
        -- sent, and its final receipt (delivered, undelivered, failed) is in
        messages.outbox_state = 'submitted' and coalesce(final_status.is_terminal, false) as is_settled,
        -- sent, and no final receipt yet: not "not delivered", the receipt may still come
        messages.outbox_state = 'submitted' and not coalesce(final_status.is_terminal, false)
            as is_awaiting_receipt,
        coalesce(clicks_per_message.clicks, 0) > 0 as clicked,
        coalesce(clicks_per_message.clicks, 0) as clicks,
        coalesce(clicks_per_message.prefetch_clicks, 0) as prefetch_clicks,
        clicks_per_message.first_clicked_at,
        coalesce(replies.replies, 0) as replies,
        coalesce(replies.replied_stop, false) as replied_stop,
        coalesce(opt_outs.opt_outs, 0) > 0 as opted_out_after,
        coalesce(conversions.conversions, 0) > 0 as converted,
        coalesce(conversions.conversions, 0) as conversions,
        coalesce(conversions.revenue, 0) as revenue,
        conversions.attributed_touch

    from messages
    inner join campaigns
        on messages.campaign_id = campaigns.campaign_id
    {% if not refresh_all %}
    inner join changed_messages
        on messages.message_id = changed_messages.message_id
    {% endif %}
    left join final_status
        on messages.message_id = final_status.message_id
    left join clicks_per_message
        on messages.message_id = clicks_per_message.message_id
    left join replies
        on messages.message_id = replies.message_id
    left join conversions
        on messages.message_id = conversions.message_id
    left join opt_outs
        on messages.message_id = opt_outs.message_id

)

select * from final
