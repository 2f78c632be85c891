-- What each contact has received and done with it: messages sent and delivered, clicks,
-- replies, and when they last happened (holdout and suppressed rows are not messages).

with

messages as (

    select * from {{ ref('stg_ops__messages') }}
    where outbox_state = 'submitted'

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

final as (

    select
        messages.contact_id,
        count(*) as messages_sent,
        cast(sum(case when final_status.final_status = 'delivered' then 1 else 0 end) as bigint) as messages_delivered,
        cast(sum(case when clicks.clicks > 0 then 1 else 0 end) as bigint) as messages_clicked,
        cast(coalesce(sum(replies.replies), 0) as bigint) as replies,
        max(messages.submitted_at) as last_sent_at,
        max(final_status.delivered_at) as last_delivered_at,
        max(clicks.last_clicked_at) as last_clicked_at,
        max(replies.first_replied_at) as last_replied_at
    from messages
    left join final_status
        on messages.message_id = final_status.message_id
    left join clicks
        on messages.message_id = clicks.message_id
    left join replies
        on messages.message_id = replies.message_id
    group by 1

)

select * from final
