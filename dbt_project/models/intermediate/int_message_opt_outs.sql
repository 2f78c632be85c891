-- Opt-outs that followed a message: each opt-out of a number (a STOP reply, a link, the
-- provider's list, an admin) belongs to the latest message sent to that number at most
-- var('opt_out_window_hours') before it.

with

messages as (

    select * from {{ ref('stg_ops__messages') }}
    where outbox_state = 'submitted'

),

consent_events as (

    select * from {{ ref('stg_ops__consent_events') }}
    where action = 'opt_out'
        -- an erasure request is recorded as an opt-out but was not caused by a message
        and event_key not like 'erasure:%'

),

candidates as (

    select
        consent_events.consent_event_id,
        messages.message_id,
        row_number() over (
            partition by consent_events.consent_event_id
            order by messages.submitted_at desc, messages.message_id desc
        ) as touch_rank
    from consent_events
    inner join messages
        on consent_events.phone_e164 = messages.phone_e164
        and consent_events.occurred_at >= messages.submitted_at
        and consent_events.occurred_at < {{ dbt.dateadd('hour', var('opt_out_window_hours'), 'messages.submitted_at') }}

),

final as (

    select
        message_id,
        count(*) as opt_outs
    from candidates
    where touch_rank = 1
    group by 1

)

select * from final
