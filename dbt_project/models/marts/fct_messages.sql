-- One row per outbox row: every recipient of every campaign, with the final status of the
-- message (or why it was not sent), its cost, and what followed it.
--
-- Incremental: a refresh recomputes only the messages that something recorded since the
-- previous build could have changed (see `changed_messages` below); everything else is
-- kept. The result is the same as a full refresh: tests/test_marts.py builds both and
-- compares them row by row.

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
-- depends_on: {{ ref('stg_ops__clicks') }}
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

with

messages as (

    select * from {{ ref('stg_ops__messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}

),

{% if not refresh_all %}

-- What could have changed since the previous build. Everything recorded after
-- `refresh_from` (the latest activity the previous build saw, capped at now, less
-- var('incremental_lookback_hours')) marks the messages it concerns; a new order, click or
-- delivery marks every message of that contact (last touch can move between them), an
-- opt-out every message to that number, and an outbox row that differs from what was
-- built marks itself.
previous as (

    select * from {{ this }}

),

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

status_events as (

    select * from {{ ref('stg_ops__message_status_events') }}

),

clicks as (

    select * from {{ ref('stg_ops__clicks') }}

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
    left join previous
        on messages.message_id = previous.message_id
    where previous.message_id is null
        or messages.outbox_state <> previous.outbox_state
        or messages.campaign_id <> previous.campaign_id
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
        or messages.submitted_at is distinct from previous.sent_at
        or (case when messages.outbox_state = 'submitted' then messages.planned_price else 0 end)
            is distinct from previous.cost

),

new_status_events as (

    select status_events.message_id
    from status_events
    cross join watermark
    where status_events.received_at >= watermark.refresh_from
        or status_events.occurred_at >= watermark.refresh_from

),

new_clicks as (

    select clicks.message_id
    from clicks
    cross join watermark
    where clicks.clicked_at >= watermark.refresh_from

),

new_replies as (

    select inbound.in_reply_to_message_id as message_id
    from inbound
    cross join watermark
    where inbound.received_at >= watermark.refresh_from
        and inbound.in_reply_to_message_id is not null

),

touched_messages as (

    select message_id from changed_outbox_rows
    union
    select message_id from new_status_events
    union
    select message_id from new_clicks
    union
    select message_id from new_replies

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

    select orders.contact_id
    from orders
    cross join watermark
    where orders.ordered_at >= watermark.refresh_from

),

touched_phones as (

    select consent_events.phone_e164
    from consent_events
    cross join watermark
    where consent_events.action = 'opt_out'
        and (
            consent_events.recorded_at >= watermark.refresh_from
            or consent_events.occurred_at >= watermark.refresh_from
        )

),

changed_messages as (

    select message_id from touched_messages

    union

    select messages.message_id
    from messages
    inner join touched_contacts
        on messages.contact_id = touched_contacts.contact_id

    union

    select messages.message_id
    from messages
    inner join touched_phones
        on messages.phone_e164 = touched_phones.phone_e164

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
        coalesce(clicks_per_message.clicks, 0) > 0 as clicked,
        coalesce(clicks_per_message.clicks, 0) as clicks,
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
