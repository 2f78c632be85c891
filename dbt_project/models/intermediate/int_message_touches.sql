-- The moments a promotional message "touched" its recipient, for attribution: its delivery
-- (for the holdout: the moment it would have been sent) and every click on its links by a
-- person (int_message_conversions gives each kind its own window; a link preview or scanner
-- fetching the link is no touch unless var('count_prefetch_clicks'): int_clicks_classified).
-- Service messages (codes, order status) are answers to what the customer did, so they
-- attract no conversions; suppressed, failed and pending messages touch nobody.

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

clicks as (

    select * from {{ ref('int_clicks_classified') }}
    {% if not counts_prefetch_clicks() %}
    where not is_prefetch
    {% endif %}

),

promo_messages as (

    select
        messages.message_id,
        messages.campaign_id,
        messages.contact_id,
        messages.outbox_state = 'holdout' as is_holdout,
        messages.planned_at
    from messages
    inner join campaigns
        on messages.campaign_id = campaigns.campaign_id

),

deliveries as (

    select
        promo_messages.message_id,
        promo_messages.campaign_id,
        promo_messages.contact_id,
        promo_messages.is_holdout,
        'delivery' as touch_type,
        case
            when promo_messages.is_holdout then promo_messages.planned_at
            else final_status.delivered_at
        end as touched_at
    from promo_messages
    left join final_status
        on promo_messages.message_id = final_status.message_id
    where promo_messages.is_holdout
        or final_status.delivered_at is not null

),

link_clicks as (

    select
        promo_messages.message_id,
        promo_messages.campaign_id,
        promo_messages.contact_id,
        promo_messages.is_holdout,
        'click' as touch_type,
        clicks.clicked_at as touched_at
    from promo_messages
    inner join clicks
        on promo_messages.message_id = clicks.message_id
    where not promo_messages.is_holdout

),

final as (

    select * from deliveries

    union all

    select * from link_clicks

)

select * from final
