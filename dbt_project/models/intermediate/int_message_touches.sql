-- The moment each promotional message "touched" its recipient, for attribution: when it
-- was delivered or, for the holdout, when it would have been sent. Service messages
-- (codes, order status) are answers to what the customer did, so they attract no
-- conversions; suppressed, failed and pending messages touch nobody.

with

messages as (

    select * from {{ ref('stg_ops__messages') }}

),

campaigns as (

    select * from {{ ref('stg_ops__campaigns') }}
    where campaign_kind = 'promo'

),

final_status as (

    select * from {{ ref('int_message_final_status') }}

),

final as (

    select
        messages.message_id,
        messages.campaign_id,
        messages.contact_id,
        messages.outbox_state = 'holdout' as is_holdout,
        case
            when messages.outbox_state = 'holdout' then messages.planned_at
            else final_status.delivered_at
        end as touched_at
    from messages
    inner join campaigns
        on messages.campaign_id = campaigns.campaign_id
    left join final_status
        on messages.message_id = final_status.message_id
    where messages.outbox_state = 'holdout'
        or final_status.delivered_at is not null

)

select * from final
