-- One row per outbox row: every recipient of every campaign, with the final status of the
-- message (or why it was not sent), its cost, and what followed it.

with

messages as (

    select * from {{ ref('stg_ops__messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}

),

final_status as (

    select * from {{ ref('int_message_final_status') }}

),

clicks as (

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
        coalesce(clicks.clicks, 0) > 0 as clicked,
        coalesce(clicks.clicks, 0) as clicks,
        clicks.first_clicked_at,
        coalesce(replies.replies, 0) as replies,
        coalesce(replies.replied_stop, false) as replied_stop,
        coalesce(opt_outs.opt_outs, 0) > 0 as opted_out_after,
        coalesce(conversions.conversions, 0) > 0 as converted,
        coalesce(conversions.conversions, 0) as conversions,
        coalesce(conversions.revenue, 0) as revenue

    from messages
    inner join campaigns
        on messages.campaign_id = campaigns.campaign_id
    left join final_status
        on messages.message_id = final_status.message_id
    left join clicks
        on messages.message_id = clicks.message_id
    left join replies
        on messages.message_id = replies.message_id
    left join conversions
        on messages.message_id = conversions.message_id
    left join opt_outs
        on messages.message_id = opt_outs.message_id

)

select * from final
