-- The final provider status of every message that has receipts.
-- Receipts arrive out of order and sometimes twice, so a status only ever moves forward:
-- accepted < queued < sending < sent < a terminal status (delivered, undelivered, failed).
-- The furthest status wins; between terminal statuses the one that occurred last wins.

with

status_events as (

    select * from {{ ref('stg_ops__message_status_events') }}

),

ranked_events as (

    select
        message_id,
        status,
        error_code,
        occurred_at,
        received_at,
        case status
            when 'accepted' then 1
            when 'queued' then 2
            when 'sending' then 3
            when 'sent' then 4
            else 5
        end as status_rank
    from status_events

),

latest as (

    select
        *,
        row_number() over (
            partition by message_id
            order by status_rank desc, occurred_at desc, received_at desc
        ) as precedence
    from ranked_events

),

milestones as (

    select
        message_id,
        min(case when status_rank >= 4 then occurred_at end) as sent_confirmed_at,
        min(case when status = 'delivered' then occurred_at end) as delivered_at,
        min(case when status in ('undelivered', 'failed') then occurred_at end) as failed_at,
        count(*) as receipts
    from ranked_events
    group by 1

),

final as (

    select
        latest.message_id,
        latest.status as final_status,
        latest.occurred_at as final_status_at,
        case when latest.status_rank = 5 then true else false end as is_terminal,
        case when latest.status in ('undelivered', 'failed') then latest.error_code end as error_code,
        milestones.sent_confirmed_at,
        milestones.delivered_at,
        milestones.failed_at,
        milestones.receipts
    from latest
    inner join milestones
        on latest.message_id = milestones.message_id
    where latest.precedence = 1

)

select * from final
